"""Adapter folders on disk: ours and peft's (read and written, safetensors only), AdapterHub's (read;
bottleneck, LoRA, prefix, MAM, UniPELT and ReFT adapters written); every write atomic.

Our folder: `adapter_config.json` = {"format": "deltatune", "version", "method", "config",
"base_model_name_or_path", "base_fingerprint"} and `adapter_model.safetensors` whose keys are
`<module path>.<tensor>` (no adapter name, so a file loads under any name). peft's folder: see
`peft_format` (the fingerprint is in its weights' metadata); AdapterHub's: see `adapterhub_format`
(read) and `adapterhub_writer` (written). A format decides the config file, the tensor keys and what is
stored of each adapter (a `FileLayout`). Every saved adapter folder also gets a model card, `README.md`
(`model_card`).

A save replaces the whole save folder in one step (`atomic`): an interrupted save leaves the old
adapter as it was, and afterwards the folder holds the adapters saved (and the subfolders kept, below).
The adapter entries of the old folder go: `adapter_config.json`, `adapter_fusion_config.json`,
`adapter_model.safetensors` and `adapter.safetensors` at its top, a model card a save wrote there, and
every subfolder that holds an adapter (ours, peft's or AdapterHub's: what `load` would read) and nothing
but those files and a card a save wrote. Everything else stays: the user's README, a model, hidden
files, and whole, every adapter subfolder holding anything else (a trainer's `checkpoint-N/` with its
optimizer and trainer state, an adapter with a README of the user's), so a save never loses a user's
file. A multi save that rewrites such a subfolder keeps a README of the user's in it as its card, and
refuses, naming the subfolder, one holding other files. Loading reads the folder again if a save
replaced it meanwhile, skips hidden subfolders (a valid adapter name never starts with '.'), and checks
every name, key and shape before it copies anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from . import adapterhub_format, adapterhub_writer, peft_format
from .adapter_tensors import OURS, FileLayout, ReadAdapter, copy_plan, copy_tensors, non_finite
from .atomic import (
    Writer,
    folder_version,
    folder_writer,
    interrupted_save,
    json_writer,
    replace_folder,
    safetensors_writer,
)
from .base_fingerprint import check_same_base
from .errors import AdapterFileError, DeltaTuneError, TrainingDivergedError
from .files import read_json, read_tensors
from .folder_checks import check_ranks, check_task_against_file
from .folder_records import (
    FINGERPRINT_KEY,
    TASK_KEY,
    adapter_records,
    checked_records,
    peft_records,
)
from .model_card import CARD_FILE, card_facts, card_writer, is_ours
from .names import check_name
from .registry import config_from_dict, get_method, registered_methods
from .task_record import fit_heads
from .version import __version__

if TYPE_CHECKING:
    from .model import DeltaModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TOP_LEVEL_ADAPTER_FILES = (
    CONFIG_FILE,
    adapterhub_format.FUSION_CONFIG,
    WEIGHTS_FILE,
    *adapterhub_format.ADAPTER_WEIGHTS,
)
LOAD_ATTEMPTS = 5


def _our_files(delta_model: DeltaModel, name: str) -> tuple[dict[str, Any], FileLayout]:
    config = delta_model.configs[name]
    model_config = getattr(delta_model.base_model, "config", None)
    data = {
        "format": "deltatune",
        "version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "base_model_name_or_path": getattr(model_config, "name_or_path", None) or None,
        **adapter_records(delta_model, name),
    }
    return data, OURS


FORMATS: dict[str, Callable[[DeltaModel, str], tuple[dict[str, Any], FileLayout]]] = {
    "deltatune": _our_files,
    "peft": peft_format.adapter_files,
    "adapterhub": adapterhub_writer.adapter_files,
}
"""Format name → (the config file's data, the weights file's layout) of one adapter. A layout with a
`weights_file` names its weights file (AdapterHub's `adapter.safetensors`); else `WEIGHTS_FILE`."""


def save_adapters(
    delta_model: DeltaModel,
    path: str | Path,
    names: list[str],
    format: str,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """One adapter: into `path`; several: into `path/<name>/` each; each with its model card (`metrics`:
    the run's final metrics, for the card), except where the folder holds a `README.md` of the user's."""
    if format not in FORMATS:
        raise DeltaTuneError(f"unknown format {format!r}; use one of {tuple(FORMATS)}")
    delta_model.require(names)
    if not names:
        raise DeltaTuneError("there is no adapter to save")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DeltaTuneError(f"names lists {', '.join(map(repr, repeated))} more than once; name each adapter once")
    root, several = Path(path), len(names) > 1
    folders = {
        name: _adapter_writers(delta_model, check_name(name), format, root / name if several else root, metrics)
        for name in names
    }
    if len(names) == 1:  # its card writer keeps a README of the user's there
        replace_folder(
            root, folders[names[0]], replaced=lambda entry: entry.name == CARD_FILE or _written_by_saves(entry)
        )
    else:
        subfolders = {name: folder_writer(writers) for name, writers in folders.items()}

        def replaced(entry: Path) -> bool:
            return _written_by_saves(entry, rewritten=entry.name in subfolders)

        replace_folder(root, subfolders, replaced=replaced)


def _adapter_writers(
    delta_model: DeltaModel, name: str, format: str, folder: Path, metrics: Mapping[str, float] | None
) -> dict[str, Writer]:
    """The writers of adapter `name`'s files in `folder`: config, weights and model card (a `README.md`
    of the user's in `folder` is copied as it is instead, `model_card.card_writer`). An adapter holding NaN
    or ±inf is refused, before anything is written: `load` would refuse the folder."""
    config, layout = FORMATS[format](delta_model, name)
    tensors = {}
    for module_name, site in delta_model.sites():
        if name in site.adapters:
            adapter = site.adapters[name]
            for tensor_name, tensor in layout.file_state(adapter).items():
                if non_finite(tensor):
                    raise TrainingDivergedError(
                        f"adapter {name!r}: {module_name}.{tensor_name} holds non-finite values (NaN or inf), so "
                        "nothing was saved; the run that trained it likely diverged: lower the learning rate and train "
                        "again"
                    )
                tensors[layout.tensor_key(module_name, adapter, tensor_name)] = tensor
    metadata = {"format": "pt"}
    if format == "peft":  # peft's config reader warns of keys it lacks; every reader of the weights skips metadata
        metadata |= {
            key: json.dumps(value, sort_keys=True) for key, value in adapter_records(delta_model, name).items()
        }
    weights_file = getattr(layout, "weights_file", WEIGHTS_FILE)  # AdapterHub's folders name it otherwise
    writers = {weights_file: safetensors_writer(tensors, metadata=metadata), CONFIG_FILE: json_writer(config)}
    facts = card_facts(delta_model, name, format, folder, metrics)
    writers[CARD_FILE] = card_writer(facts, list(writers), folder / CARD_FILE)
    return writers


def _written_by_saves(entry: Path, rewritten: bool = False) -> bool:
    """The entries of an old save folder that a new save replaces (see the module docstring): adapter files,
    a card a save wrote, and adapter subfolders holding nothing else. A subfolder this save `rewritten`
    may hold a README of the user's too: the new folder's card writer keeps it."""
    return _save_file(entry, card_kept=False) or (
        entry.is_dir()
        and not entry.is_symlink()
        and _is_adapter_folder(entry)
        and all(child.is_file() and _save_file(child, card_kept=rewritten) for child in entry.iterdir())
    )


def _save_file(entry: Path, card_kept: bool) -> bool:
    """Whether `entry` is a file a save writes: adapter files, and a model card a save wrote (any README
    where `card_kept`: the save writes it back as it is)."""
    return entry.name in TOP_LEVEL_ADAPTER_FILES or (entry.name == CARD_FILE and (card_kept or is_ours(entry)))


def load_adapters(
    delta_model: DeltaModel,
    path: str | Path,
    name: str | None,
    trainable: bool,
    autocast_adapter_dtype: bool = True,
    strict: bool = False,
) -> None:
    """Add the adapter(s) in `path` to `delta_model`; on an error none of them is added. A save that
    replaces the folder meanwhile makes it read again, so the adapters come from one save. An adapter
    recorded for other base weights warns, or with `strict` is refused."""
    root = Path(path)
    if name is not None:
        check_name(name)
    for _ in range(LOAD_ATTEMPTS):
        if _load_folder(delta_model, root, name, trainable, autocast_adapter_dtype, strict):
            return
    raise AdapterFileError(
        f"{root} was replaced by a save on every one of {LOAD_ATTEMPTS} attempts to read it; load it when the saves "
        "are done"
    )


def _load_folder(
    delta_model: DeltaModel, root: Path, name: str | None, trainable: bool, autocast_adapter_dtype: bool, strict: bool
) -> bool:
    """Load every adapter in `root`; False (with nothing added) if a save replaced it meanwhile."""
    version = folder_version(root)
    added: list[str] = []
    try:
        folders = sorted(adapter_folders(root, name), key=lambda item: _load_order(item[1]))
        _refuse_second_full(delta_model, root, [folder for _, folder in folders])
        for adapter_name, folder in folders:
            added.append(_load_one(delta_model, folder, adapter_name, trainable, autocast_adapter_dtype, strict))
    except BaseException as error:
        _delete(delta_model, added)
        if not isinstance(error, Exception) or folder_version(root) == version:
            raise
        return False
    if folder_version(root) == version:
        return True
    trained_base = [adapter for adapter in added if adapter in delta_model._base_trainers()]
    if trained_base:
        raise AdapterFileError(
            f"{root} was replaced by a save while it loaded, after adapter {trained_base[0]!r} (which trains the "
            "base's own weights) had copied its weights into the model; load it again, when the saves are done, "
            "onto a freshly loaded base"
        )
    _delete(delta_model, added)
    return False


def _delete(delta_model: DeltaModel, names: list[str]) -> None:
    """Take back the adapters a failed load added. A full fine-tuning adapter loads last (`_load_order`) and
    alone (`_refuse_second_full`), so none of them has copied weights into the base here."""
    for name in names:
        delta_model._withdraw(name)


def _refuse_second_full(delta_model: DeltaModel, root: Path, folders: list[Path]) -> None:
    """Refuse, before anything loads, a load that would give the model a second adapter that trains the base's
    own weights (full fine-tuning): the first would have copied its weights into the base, which no removal
    takes back, before the second is refused."""
    held = [f"{name!r} on the model" for name in delta_model._base_trainers()]
    held += [str(folder) for folder in folders if _method_says(folder, "trains_base")]
    if len(held) > 1:
        raise DeltaTuneError(
            f"loading {root} would give this model a second full fine-tuning adapter ({', '.join(held)}), and a "
            "model holds one, so nothing was loaded; load one of them, by name, onto a freshly loaded base"
        )


def folder_kind(folder: Path) -> str:
    """Who wrote the adapter folder, as `load` tells them apart: "adapterhub", "peft" or "deltatune"."""
    if adapterhub_format.is_adapterhub_folder(folder):
        return "adapterhub"
    data = read_json(folder / CONFIG_FILE)
    if peft_format.is_peft_config(data):
        return "peft"
    if data.get("format") != "deltatune" or "config" not in data:
        raise AdapterFileError(f"{folder / CONFIG_FILE} is neither a deltatune nor a peft adapter config")
    return "deltatune"


def _read_adapterhub(folder: Path, model: nn.Module) -> ReadAdapter:
    config, tensors, name = adapterhub_format.read_folder(folder, model)
    return ReadAdapter(config, tensors, OURS, name, folder)


def _read_peft(folder: Path, model: nn.Module) -> ReadAdapter:
    data = read_json(folder / CONFIG_FILE)
    config, tensors, layout = peft_format.read_adapter(data, folder / WEIGHTS_FILE, model)
    recorded = peft_records(folder / WEIGHTS_FILE)
    return ReadAdapter(
        config,
        tensors,
        layout,
        None,
        folder / WEIGHTS_FILE,
        recorded.get(FINGERPRINT_KEY),
        data.get("base_model_name_or_path"),
        recorded.get(TASK_KEY),
    )


def _read_ours(folder: Path, model: nn.Module) -> ReadAdapter:
    data = read_json(folder / CONFIG_FILE)
    config = config_from_dict(data["config"])
    tensors = read_tensors(folder / WEIGHTS_FILE)
    recorded = data.get("name")
    if recorded is not None:
        check_name(recorded, f"{folder / CONFIG_FILE}", AdapterFileError)
    records = checked_records(data, folder / CONFIG_FILE)
    return ReadAdapter(
        config,
        tensors,
        OURS,
        recorded,
        folder / WEIGHTS_FILE,
        records.get(FINGERPRINT_KEY),
        data.get("base_model_name_or_path"),
        records.get(TASK_KEY),
    )


READERS: dict[str, Callable[[Path, nn.Module], ReadAdapter]] = {
    "adapterhub": _read_adapterhub,
    "peft": _read_peft,
    "deltatune": _read_ours,
}
"""`folder_kind` → the reader of such a folder."""


def _load_one(
    delta_model: DeltaModel,
    folder: Path,
    name: str | None,
    trainable: bool,
    autocast_adapter_dtype: bool,
    strict: bool = False,
) -> str:
    """Load the adapter in `folder` (under `name`, else the name it records); returns its name. One
    recorded for another base warns, or with `strict` is refused (`base_fingerprint.check_same_base`)."""
    read = READERS[folder_kind(folder)](folder, delta_model.base_model)
    adapter_name = name or read.recorded_name or "default"
    check_task_against_file(read, delta_model.base_model, folder)  # before a recorded head shape is built
    check_ranks(read, delta_model.base_model, folder)  # before a configured rank is allocated
    restore_heads = fit_heads(delta_model.base_model, read.task, folder)
    try:
        delta_model.add(
            adapter_name,
            read.config,
            trainable=trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            weights_from_file=True,
        )
    except BaseException:
        restore_heads()
        raise
    try:  # every check before the first copy: a `full` adapter's weights are the base's own
        plan = copy_plan(delta_model, adapter_name, read)
        record = delta_model.records[adapter_name]
        check_same_base(read.base_fingerprint, record.base_fingerprint, adapter_name, folder, read.base_model, strict)
        copy_tensors(plan)
        if read.base_fingerprint:
            record.base_fingerprint = read.base_fingerprint
    except BaseException:
        delta_model._withdraw(adapter_name)
        restore_heads()
        raise
    return adapter_name


def _load_order(folder: Path) -> tuple[bool, bool]:
    """Sort key of a folder's adapters: an adapter whose method trains the base's own weights (full
    fine-tuning) last, so that any other adapter's failure comes before those weights are copied; an
    adapter built on others (a fusion) after them."""
    if adapterhub_format.is_fusion_folder(folder):
        return False, True
    return _method_says(folder, "trains_base"), _method_says(folder, "needs_other_adapters")


def _method_says(folder: Path, flag: str) -> bool:
    """Whether the method of the deltatune-format adapter in `folder` sets `flag` (a fusion folder has no
    adapter config: its own reader checks it)."""
    if adapterhub_format.is_fusion_folder(folder):
        return False
    data = read_json(folder / CONFIG_FILE)
    method = data.get("method") if data.get("format") == "deltatune" else None
    return method in registered_methods() and getattr(get_method(method), flag, False)


def _is_adapter_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or adapterhub_format.is_fusion_folder(folder)


def adapter_folders(root: Path, name: str | None) -> list[tuple[str | None, Path]]:
    """(name, folder) of the adapter at `root`, or of each adapter subfolder (hidden ones skipped:
    staging of saves and other tools' files, never a valid adapter name)."""
    if _is_adapter_folder(root):
        return [(name, root)]
    if root.is_dir():
        found = sorted(
            child for child in root.iterdir() if not child.name.startswith(".") and _is_adapter_folder(child)
        )
        chosen = [child for child in found if name is None or child.name == name]
        if chosen:
            return [(check_name(child.name, f"{child}", AdapterFileError), child) for child in chosen]
        if found:
            raise AdapterFileError(
                f"no adapter {name!r} in {root}; it holds {', '.join(repr(child.name) for child in found)}: load one "
                "of those, or all with no name"
            )
    aside = interrupted_save(root)
    if aside is not None:
        raise AdapterFileError(
            f"no adapter at {root}: a save into it was killed; the adapter saved before is in {aside}: save again, or "
            "rename that folder back"
        )
    raise AdapterFileError(
        f"no adapter at {root}: expected {CONFIG_FILE} and {WEIGHTS_FILE} there, or subfolders holding them"
    )
