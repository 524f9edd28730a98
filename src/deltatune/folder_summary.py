"""What an adapter folder is, told without a model (for `deltatune show`): who wrote it (`io.folder_kind`),
its method, config and weights file (`describe_folder`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import adapterhub_format
from .files import read_json, tensor_count
from .io import CONFIG_FILE, WEIGHTS_FILE, folder_kind


@dataclasses.dataclass(frozen=True)
class FolderSummary:
    """What `describe_folder` tells of an adapter folder, without a model."""

    kind: str
    """Who wrote it: "deltatune", "peft" or "adapterhub"."""
    method: str
    config: dict[str, Any]
    weights: Path | None
    """Its weights file, if it has one."""

    def tensor_count(self) -> tuple[int, int]:
        """(tensors, parameters) in the weights file; (0, 0) without one."""
        return tensor_count(self.weights) if self.weights is not None else (0, 0)


def describe_folder(path: str | Path) -> FolderSummary:
    """Kind, method, config and weights file of the adapter folder `path` (for `deltatune show`)."""
    folder = Path(path)
    kind = folder_kind(folder)
    return FolderSummary(kind, *DESCRIBERS[kind](folder))


def _describe_peft(folder: Path) -> tuple[str, dict[str, Any], Path | None]:
    data = read_json(folder / CONFIG_FILE)
    return data["peft_type"], data, _weights_file(folder)


def _describe_ours(folder: Path) -> tuple[str, dict[str, Any], Path | None]:
    data = read_json(folder / CONFIG_FILE)
    return data.get("method", ""), data["config"], _weights_file(folder)


def _weights_file(folder: Path) -> Path | None:
    return folder / WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else None


DESCRIBERS: dict[str, Callable[[Path], tuple[str, dict[str, Any], Path | None]]] = {
    "adapterhub": adapterhub_format.describe,
    "peft": _describe_peft,
    "deltatune": _describe_ours,
}
"""`folder_kind` → (method, config, weights file) of such a folder."""
