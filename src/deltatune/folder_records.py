"""What an adapter folder records beside the adapter itself: the base it was trained on (`base_fingerprint`)
and its task, labels and heads (`task_record`). Our format keeps them as keys of `adapter_config.json`
(beside `base_model_name_or_path`); peft's as JSON strings in the weights file's metadata, since peft's
config reader warns of every key its config class lacks, while every reader of the weights (peft,
transformers' `load_adapter`) skips the metadata.

Both are checked where a folder is read (`checked_records`): a record of another form than its module
writes (`base_fingerprint.fingerprint_problem`, `task_record.task_problem`), hand-edited or written by
something else, is an `AdapterFileError` naming the file and the record, before anything is loaded; a
null record is one the folder does not keep (as an older save's). A task record is then checked against the
folder's weights file and the model it loads onto (`folder_checks`), before any head is rebuilt."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base_fingerprint import fingerprint_problem
from .errors import AdapterFileError
from .files import read_json, read_metadata
from .peft_format import is_peft_config
from .task_record import TASK_KEY, task_problem, task_record

if TYPE_CHECKING:
    from .model import DeltaModel

FINGERPRINT_KEY = "base_fingerprint"
PROBLEMS: dict[str, Callable[[Any], str | None]] = {FINGERPRINT_KEY: fingerprint_problem, TASK_KEY: task_problem}
"""{record key: what is wrong with such a record read from a folder (None: nothing)}."""


def adapter_records(delta_model: DeltaModel, name: str) -> dict[str, Any]:
    """{record key: value} of adapter `name` (a record with nothing to say is left out)."""
    records = {FINGERPRINT_KEY: delta_model.records[name].base_fingerprint, TASK_KEY: task_record(delta_model, name)}
    return {key: value for key, value in records.items() if value is not None}


def peft_records(weights: Path) -> dict[str, Any]:
    """The records a peft folder saved here keeps in the metadata of its weights file `weights`."""
    metadata = read_metadata(weights)
    records = {}
    for key in PROBLEMS:
        if key in metadata:
            try:
                records[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise AdapterFileError(f"{weights} records a broken {key}; save the adapter again") from None
    return checked_records(records, weights)


def checked_records(data: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """{record key: record} of the records in `data` (read from `source`), null ones left out, each checked."""
    records = {key: data[key] for key in PROBLEMS if data.get(key) is not None}
    for key, record in records.items():
        problem = PROBLEMS[key](record)
        if problem is not None:
            raise AdapterFileError(
                f"{source} records a malformed {key} ({problem}); save the adapter again, or delete that record to "
                "load the adapter without it"
            )
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
    return checked_records(data, config_file).get(TASK_KEY) if data.get("format") == "deltatune" else None
