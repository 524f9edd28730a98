"""What an adapter folder records beside the adapter itself: the base it was trained on (`base_fingerprint`)
and its task, labels and heads (`task_record`). Our format keeps them as keys of `adapter_config.json`
(beside `base_model_name_or_path`); peft's as JSON strings in the weights file's metadata, since peft's
config reader warns of every key its config class lacks, while every reader of the weights (peft,
transformers' `load_adapter`) skips the metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterFileError
from .files import read_json, read_metadata
from .peft_format import is_peft_config
from .task_record import TASK_KEY, task_record

if TYPE_CHECKING:
    from .model import DeltaModel

FINGERPRINT_KEY = "base_fingerprint"
RECORDED = (FINGERPRINT_KEY, TASK_KEY)


def adapter_records(delta_model: DeltaModel, name: str) -> dict[str, Any]:
    """{record key: value} of adapter `name` (a record with nothing to say is left out)."""
    records = {FINGERPRINT_KEY: delta_model.records[name].base_fingerprint, TASK_KEY: task_record(delta_model, name)}
    return {key: value for key, value in records.items() if value is not None}


def peft_records(weights: Path) -> dict[str, Any]:
    """The records a peft folder saved here keeps in the metadata of its weights file `weights`."""
    metadata = read_metadata(weights)
    records = {}
    for key in RECORDED:
        if key in metadata:
            try:
                records[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise AdapterFileError(f"{weights} records a broken {key}; save the adapter again") from None
    return records


def recorded_task(path: str | Path) -> dict[str, Any] | None:
    """The task record of the adapter folder `path`; None where it records none (a folder of several
    adapters, an older save, a folder another library wrote)."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    data = read_json(config_file)
    if is_peft_config(data):
        weights = Path(path) / "adapter_model.safetensors"
        return peft_records(weights).get(TASK_KEY) if weights.is_file() else None
    return data.get(TASK_KEY) if data.get("format") == "deltatune" else None
