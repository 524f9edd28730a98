"""Reading the files of adapter folders: JSON configs and tensors (safetensors; AdapterHub's weights-only
pickles). Every failure is an `AdapterFileError` that names the file and says what to do."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from .errors import AdapterFileError

Read = TypeVar("Read")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"cannot read {path}: {error}; save the adapter again") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`."""
    return _read_safetensors(path, lambda file: {key: file.get_tensor(key) for key in file.keys()})


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of the safetensors file `path` (none: `{}`)."""
    return _read_safetensors(path, lambda file: dict(file.metadata() or {}))


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` file, read with `weights_only=True` (anything but tensors is refused)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for broken or unsafe files
        raise AdapterFileError(f"cannot read {path} as plain tensors ({type(error).__name__}: {error})") from None


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape in a weights file; a safetensors file is read from its header alone."""
    if path.suffix != ".safetensors":
        return {name: list(tensor.shape) for name, tensor in read_pickled_tensors(path).items()}
    return _read_safetensors(path, lambda file: {key: file.get_slice(key).get_shape() for key in file.keys()})


def tensor_count(path: Path) -> tuple[int, int]:
    """(tensors, parameters) in a weights file; a safetensors file is counted from its header alone."""
    shapes = tensor_shapes(path).values()
    return len(shapes), sum(math.prod(shape) for shape in shapes)


def _read_safetensors(path: Path, read: Callable[[Any], Read]) -> Read:
    """`read(file)` on the opened safetensors file, with a missing, truncated or corrupted file said plainly."""
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: the adapter folder is incomplete; save it again")
    try:
        with safe_open(str(path), framework="pt") as file:
            return read(file)
    except Exception as error:  # safetensors raises several types for broken files
        raise AdapterFileError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); save or copy the adapter again"
        ) from None
