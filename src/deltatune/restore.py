"""A trainer's resume (or best-model load) from a checkpoint's adapter folder: the weights saved there are copied
back into the model's adapters of the same names, in place, so the parameters stay the objects an optimizer holds.

Nothing is copied before every adapter of the folder is known to be the model's: the same method and settings as
the folder's format records them (`same_adapter`), the same task, label names in id order and head shapes
(`task_record`), the same base weights (`base_fingerprint`, strictly), the same keys and shapes
(`adapter_tensors.copy_plan`). The folder is read as `load` reads it (`io.READERS`).

A checkpoint must also keep the adapter whole: every tensor of its `file_state()` as it is (`lost_tensors`). A
format may store less: peft's keeps the prompt a P-tuning encoder or a prefix-tuning MLP computes, not the
encoder, and training cannot continue from that output. A restore from such a folder is refused, naming what it
lacks; a trainer writes its checkpoints of such an adapter in deltatune's format (`lost_in`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapter_tensors import FileLayout, ReadAdapter, copy_plan, copy_tensors
from .base_fingerprint import check_same_base
from .errors import AdapterFileError, CheckpointMismatchError, DeltaTuneError
from .files import read_json
from .io import CONFIG_FILE, FORMATS, READERS, adapter_folders, folder_kind
from .same_adapter import check_same_settings, differences, take_settings
from .task_record import label_names, task_record

if TYPE_CHECKING:
    from .model import DeltaModel


def restore_weights(delta_model: DeltaModel, path: str | Path) -> None:
    """Copy the weights in the adapter folder `path` (as `save` wrote it) into the model's adapters of the same
    names, in place: the parameters stay the objects an optimizer holds (a trainer resuming from a checkpoint).
    A folder holding one adapter fills the model's only adapter, or the one it records. Before anything is
    copied, every adapter is checked to be the one the folder holds: its method and settings
    (`same_adapter`; a setting the run writes is taken from the folder), the base weights it was trained on
    (strictly), its keys and shapes. A refused restore leaves the model as it was."""
    plans, undo = [], []
    try:
        for name, folder in adapter_folders(Path(path), None):
            kind = folder_kind(folder)
            read = READERS[kind](folder, delta_model.base_model)
            only = next(iter(delta_model.records)) if len(delta_model.records) == 1 else None
            adapter_name = name or read.recorded_name or only
            if adapter_name is None:
                raise AdapterFileError(
                    f"{folder} holds one adapter and does not record its name, but this model has "
                    f"{sorted(delta_model.records)}: load it with deltatune.load(model, path, name=...) instead"
                )
            delta_model.require([adapter_name])
            taken = _check_same_adapter(delta_model, adapter_name, kind, folder, read)
            undo.append(take_settings(delta_model, adapter_name, taken))
            plans.append(copy_plan(delta_model, adapter_name, read))
    except DeltaTuneError:
        for give_back in reversed(undo):
            give_back()
        raise
    for plan in plans:
        copy_tensors(plan)


def _check_same_adapter(
    delta_model: DeltaModel, name: str, kind: str, folder: Path, read: ReadAdapter
) -> dict[str, Any]:
    """Refuse a `kind` folder whose adapter has other settings or base weights than adapter `name` of the model;
    the folder's values of the settings that differ only because the run writes them (`same_adapter`)."""
    try:
        written, layout = FORMATS[kind](delta_model, name)
    except DeltaTuneError as error:
        raise CheckpointMismatchError(
            f"{folder} is a {kind} adapter folder, but this model's adapter {name!r} "
            f"({delta_model.configs[name].method}) cannot be written as one, so the folder is not its checkpoint: "
            "resume from a checkpoint its own run wrote"
        ) from error
    method = delta_model.configs[name].method
    taken = check_same_settings(kind, read_json(folder / CONFIG_FILE), written, name, folder, method)
    _check_same_task(delta_model, name, folder, read)
    record = delta_model.records[name]
    check_same_base(read.base_fingerprint, record.base_fingerprint, name, folder, read.base_model, strict=True)
    lost = lost_tensors(delta_model, name, layout)
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise CheckpointMismatchError(
            f"{folder} keeps less of adapter {name!r} ({method}) than training changes: {kind}'s format does not "
            f"store {lost[0]!r}{more} as it is (it stores what they compute), so training cannot continue from it; "
            "resume from a checkpoint in deltatune's format (a trainer writes those for such an adapter), or load the "
            "folder with deltatune.load to use the adapter as saved"
        )
    return taken


def _check_same_task(delta_model: DeltaModel, name: str, folder: Path, read: ReadAdapter) -> None:
    """Refuse a checkpoint whose task record (task, label names in id order, head shapes) differs from the one
    adapter `name` of the model gives: its head's rows would be copied under other label names, and the resumed
    run would train them against other targets. A folder that records no task (an older save) is not compared."""
    now = task_record(delta_model, name)
    if read.task is None or read.task == now:
        return
    before_labels, now_labels = label_names(read.task), label_names(now)
    if before_labels != now_labels:
        described = f"labels {before_labels} in id order, this model's are {now_labels}"
    else:
        described = ", ".join(differences(read.task, now or {}))
    raise CheckpointMismatchError(
        f"{folder} holds adapter {name!r} trained for another task record ({described}), so resuming from it would "
        "continue another run with its head under other labels: build the model with the checkpoint's labels "
        "(id2label), or train afresh without resume_from_checkpoint"
    )


def lost_tensors(delta_model: DeltaModel, name: str, layout: FileLayout) -> list[str]:
    """The tensors of adapter `name`, as `<module path>.<tensor name>`, that a weights file of `layout` does not
    store as they are (of the same name, shape and values): those a restore from it could not give back."""
    lost = []
    for module_name, site in delta_model.sites():
        if name in site.adapters:
            adapter = site.adapters[name]
            stored = layout.file_state(adapter)
            for tensor_name, tensor in adapter.file_state().items():
                kept = stored.get(tensor_name)
                if kept is None or kept.shape != tensor.shape or not torch.equal(kept, tensor):
                    lost.append(f"{module_name}.{tensor_name}")
    return lost


def lost_in(delta_model: DeltaModel, format: str) -> dict[str, list[str]]:
    """Adapter name → its `lost_tensors` in a `format` folder, for each adapter of `delta_model` that such a
    folder does not keep whole (empty: the format keeps every adapter, so a checkpoint may be written in it)."""
    found = {
        name: lost_tensors(delta_model, name, FORMATS[format](delta_model, name)[1]) for name in delta_model.records
    }
    return {name: lost for name, lost in found.items() if lost}
