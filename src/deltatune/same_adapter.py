"""Whether a checkpoint's adapter folder holds the adapter a model has, before a trainer resuming from it copies
its weights in (`restore.restore_weights`): the same method and settings, so that training continues the same run.

The settings are compared as the checkpoint's format records them. The model's adapter is written by the
writer that wrote the checkpoint (`io.FORMATS`), and both config files are read by that format's config
reader. What a format cannot tell apart is then alike on both sides (peft's folder records the modules
`target_modules="all-linear"` matched, not the pattern), and a setting a later deltatune added reads as its
default. What a folder records besides the adapter (deltatune's version, the base model's path, the base
fingerprint, the task) is not a setting; the base fingerprint and the task are checked on their own (`restore`).

A setting the run itself writes into the config as it trains (`RUN_WRITTEN`: AdaLoRA's `rank_pattern`, which the
rank budget records at each allocation) is no sign of another run: the model takes the checkpoint's value, so a
fresh process resumes after the ranks were fixed, and a best checkpoint from before that step loads at the end.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointMismatchError
from .methods.adalora_budget import record_rank_pattern
from .peft_format import codec_of_type
from .registry import config_from_dict

if TYPE_CHECKING:
    from .model import DeltaModel

SHOWN_VALUE_LENGTH = 40
"""Differing values up to this many characters (as JSON) are shown in an error, longer ones only named."""


def _our_settings(data: dict[str, Any]) -> dict[str, Any]:
    return config_from_dict(data["config"]).to_dict()


def _peft_settings(data: dict[str, Any]) -> dict[str, Any]:
    return codec_of_type(data.get("peft_type")).config_from_peft(data).to_dict()


def _adapterhub_settings(data: dict[str, Any]) -> dict[str, Any]:
    return data["config"]


SETTINGS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "deltatune": _our_settings,
    "peft": _peft_settings,
    "adapterhub": _adapterhub_settings,
}
"""`io.folder_kind` → the adapter's settings as that format's `adapter_config.json` data records them."""


RUN_WRITTEN: dict[str, dict[str, Callable[[DeltaModel, str, Any], None]]] = {
    "adalora": {"rank_pattern": record_rank_pattern},
}
"""method → {setting its training run writes: how adapter `name` of a model takes a checkpoint's value}."""


def check_same_settings(
    kind: str, recorded: dict[str, Any], written: dict[str, Any], adapter_name: str, folder: Path, method: str
) -> dict[str, Any]:
    """Refuse (`CheckpointMismatchError`) when the `kind` config file `recorded` in checkpoint `folder` holds
    other settings than `written`, the one the model's `method` adapter `adapter_name` gives in that format now;
    the checkpoint's values of the differing settings the run writes (`RUN_WRITTEN`), for the model to take."""
    with warnings.catch_warnings():  # the folder's reader has warned of its unknown keys already
        warnings.simplefilter("ignore")
        before, now = (_as_json(SETTINGS[kind](_as_json(data))) for data in (recorded, written))
    run_written = RUN_WRITTEN.get(method, {})
    taken = {name: before.get(name) for name in run_written if before.get(name) != now.get(name)}
    differ = differences({**before, **taken}, {**now, **taken})
    if differ:
        described = ", ".join(differ)
        raise CheckpointMismatchError(
            f"{folder} holds adapter {adapter_name!r} with other settings than this model's ({described}), so "
            "resuming from it would continue another run: resume with the settings it was trained with, or train "
            "afresh without resume_from_checkpoint"
        )
    return taken


def take_settings(delta_model: DeltaModel, name: str, taken: dict[str, Any]) -> Callable[[], None]:
    """Give adapter `name` the checkpoint's values `taken` of settings its run writes; a function that gives it
    back the values it had (for a restore refused afterwards)."""
    config = delta_model.configs[name]
    takers = RUN_WRITTEN.get(config.method, {})
    previous = {setting: getattr(config, setting) for setting in taken}
    for setting, value in taken.items():
        takers[setting](delta_model, name, value)

    def undo() -> None:
        for setting, value in previous.items():
            takers[setting](delta_model, name, value)

    return undo


def _as_json(value: Any) -> Any:
    """`value` as a JSON file gives it back (tuples as lists, mapping keys as text)."""
    return json.loads(json.dumps(value, sort_keys=True))


def differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Each setting whose value differs between two records (one that only one has counts as null in the
    other), by name: `lora_alpha: 8 → 64`, or the name alone for long values."""
    differ = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
    return [_difference(name, before.get(name), now.get(name)) for name in differ]


def _difference(name: str, before: Any, now: Any) -> str:
    shown = json.dumps(before), json.dumps(now)
    return name if max(map(len, shown)) > SHOWN_VALUE_LENGTH else f"{name}: {shown[0]} → {shown[1]}"
