"""Adapter folders on disk: ours and peft's, safetensors only, every write atomic.

Our folder: `adapter_config.json` = {"format": "deltatune", "version", "method", "config",
"base_model_name_or_path"} and `adapter_model.safetensors` whose keys are `<module path>.<tensor>`
(no adapter name, so a file loads under any name). peft's folder: see `peft_format`.

A save replaces the whole save folder in one step (`atomic`): an interrupted save leaves the old
adapter as it was, and afterwards the folder holds exactly the adapters saved. The adapter entries of
the old folder go: `adapter_config.json`, `adapter_fusion_config.json` and `adapter_model.safetensors`
at its top, and every subfolder that holds an adapter (ours, peft's or AdapterHub's: what `load` would
read). Everything else in it (a README, a model, hidden files) stays. Loading reads the folder again if
a save replaced it meanwhile, skips hidden subfolders (a valid adapter name never starts with '.'), and
checks every name, key and shape before it copies anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import __version__, adapterhub_format, peft_format
from .atomic import Writer, folder_version, folder_writer, interrupted_save, json_writer, replace_folder, safetensors_writer
from .config import DeltaConfig
from .errors import AdapterFileError, AdapterShapeError, DeltaTuneError
from .methods.soft_prompt import SoftPromptConfig
from .names import check_name
from .registry import config_from_dict, get_method, registered_methods

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMATS = ("deltatune", "peft")
TOP_LEVEL_ADAPTER_FILES = (CONFIG_FILE, adapterhub_format.FUSION_CONFIG, WEIGHTS_FILE)
LOAD_ATTEMPTS = 5


def save_adapters(delta_model: Any, path: str | Path, names: list[str], format: str) -> None:
    """One adapter: into `path`; several: into `path/<name>/` each."""
    if format not in FORMATS:
        raise DeltaTuneError(f"unknown format {format!r}; use one of {FORMATS}")
    delta_model.require(names)
    if not names:
        raise DeltaTuneError("there is no adapter to save")
    folders = {name: _adapter_writers(delta_model, check_name(name), format == "peft") for name in names}
    if len(names) == 1:
        replace_folder(Path(path), folders[names[0]], replaced=_written_by_saves)
    else:
        replace_folder(Path(path), {name: folder_writer(writers) for name, writers in folders.items()}, replaced=_written_by_saves)


def _adapter_writers(delta_model: Any, name: str, peft: bool) -> dict[str, Writer]:
    """The writers of adapter `name`'s two files."""
    if peft:
        config = peft_format.config_to_peft(delta_model.configs[name], delta_model.targets[name], delta_model.base_model)
    else:
        config = _our_config(delta_model, name)
    weights = safetensors_writer(_file_tensors(delta_model, name, peft), metadata={"format": "pt"})
    return {WEIGHTS_FILE: weights, CONFIG_FILE: json_writer(config)}


def _written_by_saves(entry: Path) -> bool:
    """The entries of an old save folder that a new save replaces (see the module docstring)."""
    return entry.name in TOP_LEVEL_ADAPTER_FILES or _is_adapter_folder(entry)


def load_adapters(model: nn.Module, path: str | Path, name: str | None, trainable: bool, autocast_adapter_dtype: bool = True) -> Any:
    """Load the adapter(s) in `path` onto `model` (a plain model or a `DeltaModel`). A save that
    replaces the folder meanwhile makes it read again, so the adapters come from one save."""
    from .model import DeltaModel

    root = Path(path)
    if name is not None:
        check_name(name)
    delta_model = model if isinstance(model, DeltaModel) else DeltaModel(model)
    try:
        for _ in range(LOAD_ATTEMPTS):
            if _load_folder(delta_model, root, name, trainable, autocast_adapter_dtype):
                return delta_model
        raise AdapterFileError(f"{root} was replaced by a save on every one of {LOAD_ATTEMPTS} attempts to read it; load it when the saves are done")
    except BaseException:
        if delta_model is not model:
            delta_model.unload(merge=False)
        raise


def _load_folder(delta_model: Any, root: Path, name: str | None, trainable: bool, autocast_adapter_dtype: bool) -> bool:
    """Load every adapter in `root`; False (with nothing added) if a save replaced it meanwhile."""
    version = folder_version(root)
    added: list[str] = []
    try:
        folders = sorted(_adapter_folders(root, name), key=lambda item: _needs_other_adapters(item[1]))
        for adapter_name, folder in folders:
            added.append(_load_one(delta_model, folder, adapter_name, trainable, autocast_adapter_dtype))
    except BaseException as error:
        _delete(delta_model, added)
        if not isinstance(error, Exception) or folder_version(root) == version:
            raise
        return False
    if folder_version(root) == version:
        return True
    _delete(delta_model, added)
    return False


def _delete(delta_model: Any, names: list[str]) -> None:
    for name in names:
        delta_model.delete(name)


def _load_one(delta_model: Any, folder: Path, name: str | None, trainable: bool, autocast_adapter_dtype: bool) -> str:
    """Load the adapter in `folder` (under `name`, else the name it records); returns its name."""
    if adapterhub_format.is_adapterhub_folder(folder):
        config, tensors, adapter_name = adapterhub_format.read_folder(folder, delta_model.base_model)
        _add_and_copy(delta_model, name or adapter_name, config, tensors, False, folder, trainable, autocast_adapter_dtype)
        return name or adapter_name
    data = _read_json(folder / CONFIG_FILE)
    if peft_format.is_peft_config(data):
        config: DeltaConfig = peft_format.config_from_peft(data)
        peft = True
        tensors = _read_tensors(folder / WEIGHTS_FILE)
        tensors = peft_format.tensors_from_peft(data, tensors, delta_model.base_model)
        config = _keep_saved_modules(config, tensors, delta_model.base_model)
        adapter_name = name or "default"
    else:
        if data.get("format") != "deltatune" or "config" not in data:
            raise AdapterFileError(f"{folder / CONFIG_FILE} is neither a deltatune nor a peft adapter config")
        config = config_from_dict(data["config"])
        peft = False
        tensors = _read_tensors(folder / WEIGHTS_FILE)
        recorded = data.get("name")
        if recorded is not None:
            check_name(recorded, f"{folder / CONFIG_FILE}", AdapterFileError)
        adapter_name = name or recorded or "default"
    _add_and_copy(delta_model, adapter_name, config, tensors, peft, folder / WEIGHTS_FILE, trainable, autocast_adapter_dtype)
    return adapter_name


def _add_and_copy(delta_model: Any, name: str, config: DeltaConfig, tensors: dict[str, torch.Tensor], peft: bool, file: Path, trainable: bool, autocast_adapter_dtype: bool) -> None:
    delta_model.add(name, config, trainable=trainable, autocast_adapter_dtype=autocast_adapter_dtype, weights_from_file=True)
    try:
        _copy_into(delta_model, name, tensors, peft, file)
    except BaseException:
        delta_model.delete(name)
        raise


def _needs_other_adapters(folder: Path) -> bool:
    """Whether the folder holds an adapter built on others (a fusion), which loads after them."""
    if adapterhub_format.is_fusion_folder(folder):
        return True
    data = _read_json(folder / CONFIG_FILE)
    method = data.get("method") if data.get("format") == "deltatune" else None
    return method in registered_methods() and getattr(get_method(method), "needs_other_adapters", False)


def _copy_into(delta_model: Any, name: str, tensors: dict[str, torch.Tensor], peft: bool, file: Path) -> None:
    """Check that the file holds exactly the adapter's tensors with the right shapes, then copy."""
    plan: list[tuple[Any, dict[str, torch.Tensor]]] = []
    used: set[str] = set()
    for module_name, site in delta_model.sites():
        if name not in site.adapters:
            continue
        adapter = site.adapters[name]
        loaded = {}
        for tensor_name, current in adapter.file_state().items():
            file_key = _file_key(module_name, adapter, tensor_name, peft)
            if file_key not in tensors:
                raise AdapterShapeError(
                    f"{file} has no tensor {file_key!r} that this model needs; the adapter was made for "
                    "another model (or with another config)"
                )
            stored = tensors[file_key]
            if stored.shape != current.shape:
                raise AdapterShapeError(
                    f"{file_key}: the file holds shape {tuple(stored.shape)}, the model needs "
                    f"{tuple(current.shape)}; the adapter was made for a model of another shape"
                )
            loaded[tensor_name] = stored.to(dtype=current.dtype, device=current.device)
            used.add(file_key)
        plan.append((adapter, loaded))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterShapeError(
            f"{file} holds {len(extra)} tensor(s) this model has no place for, first {extra[0]!r}; the "
            "adapter was made for another model"
        )
    for adapter, loaded in plan:
        adapter.load_file_state(loaded)


def _keep_saved_modules(config: DeltaConfig, tensors: dict[str, torch.Tensor], model: nn.Module) -> DeltaConfig:
    """peft lists default heads ("classifier", "score") in modules_to_save whether or not the model has
    them; keep the entries whose weights the file holds."""
    if not config.modules_to_save:
        return config
    names = [n for n, _ in model.named_modules()]
    kept = [
        entry for entry in dict.fromkeys(config.modules_to_save)
        if any((n == entry or n.endswith("." + entry)) and any(k.startswith(peft_format.PREFIX + n + ".") for k in tensors) for n in names)
    ]
    return config.replace(modules_to_save=kept or None)


def _is_adapter_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or adapterhub_format.is_fusion_folder(folder)


def _adapter_folders(root: Path, name: str | None) -> list[tuple[str | None, Path]]:
    """(name, folder) of the adapter at `root`, or of each adapter subfolder (hidden ones skipped:
    staging of saves and other tools' files, never a valid adapter name)."""
    if _is_adapter_folder(root):
        return [(name, root)]
    if root.is_dir():
        found = sorted(child for child in root.iterdir() if not child.name.startswith(".") and _is_adapter_folder(child))
        if name is not None:
            found = [child for child in found if child.name == name]
        if found:
            return [(check_name(child.name, f"{child}", AdapterFileError), child) for child in found]
    aside = interrupted_save(root)
    if aside is not None:
        raise AdapterFileError(f"no adapter at {root}: a save into it was killed; the adapter saved before is in {aside}: save again, or rename that folder back")
    raise AdapterFileError(
        f"no adapter at {root}: expected {CONFIG_FILE} and {WEIGHTS_FILE} there, or subfolders holding them"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"cannot read {path}: {error}; save the adapter again") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: the adapter folder is incomplete; save it again")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # safetensors raises several types for broken files
        raise AdapterFileError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); save or copy the adapter again"
        ) from None


def _file_key(module_name: str, adapter: Any, tensor_name: str, peft: bool) -> str:
    """A tensor's key in the weights file: `<module>.<tensor>` here, peft's naming with `peft`."""
    if peft:
        return peft_format.peft_key(module_name, adapter.peft_names[tensor_name])
    return f"{module_name}.{tensor_name}"


def _our_config(delta_model: Any, name: str) -> dict[str, Any]:
    model_config = getattr(delta_model.base_model, "config", None)
    return {
        "format": "deltatune",
        "version": __version__,
        "name": name,
        "method": delta_model.configs[name].method,
        "config": delta_model.configs[name].to_dict(),
        "base_model_name_or_path": getattr(model_config, "name_or_path", None) or None,
    }


def _file_tensors(delta_model: Any, name: str, peft: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    for module_name, site in delta_model.sites():
        if name in site.adapters:
            adapter = site.adapters[name]
            # peft keeps a prompt encoder's output only: such adapters give it as `peft_file_state`
            state = adapter.peft_file_state() if peft and hasattr(adapter, "peft_file_state") else adapter.file_state()
            for tensor_name, tensor in state.items():
                tensors[_file_key(module_name, adapter, tensor_name, peft)] = tensor
    if peft and isinstance(delta_model.configs[name], SoftPromptConfig):
        return peft_format.soft_prompt_keys_to_peft(tensors)
    return tensors
