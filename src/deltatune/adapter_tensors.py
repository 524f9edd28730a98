"""One adapter's tensors as a folder holds them (`ReadAdapter`, keyed as its format's `FileLayout` says)
and their copy into a model's adapter parts: `copy_plan` checks that the file holds exactly the adapter's
tensors with the right shapes, each of the model part's kind (float or not) and finite once cast to the part's
dtype, before `copy_tensors` copies any (a load or a checkpoint restore changes nothing on a bad file)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .config import DeltaConfig
from .errors import AdapterFileError, AdapterShapeError
from .merging import _all_finite
from .site_adapter import SiteAdapter

if TYPE_CHECKING:
    from .model import DeltaModel


class FileLayout(Protocol):
    """How a format names and stores one adapter's tensors in its weights file."""

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        """The key of tensor `tensor_name` (a key of `adapter.file_state()`) of `adapter` at `module_name`."""

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        """The tensors the format stores of `adapter`, by their names in `adapter.file_state()`."""


class OurLayout:
    """Our weights file: every tensor of `file_state()` under `<module path>.<tensor name>`."""

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        return f"{module_name}.{tensor_name}"

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        return adapter.file_state()


OURS = OurLayout()


@dataclasses.dataclass(frozen=True)
class ReadAdapter:
    """One adapter as a folder holds it, read and checked, before anything is added to a model."""

    config: DeltaConfig
    tensors: dict[str, torch.Tensor]
    layout: FileLayout
    recorded_name: str | None
    """The name the folder records (AdapterHub's and ours), if any."""
    source: Path
    """Where the tensors come from, for errors."""
    base_fingerprint: dict[str, Any] | None = None
    """The print of the base it was trained on (`base_fingerprint`), where the folder records one."""
    base_model: str | None = None
    """The folder's `base_model_name_or_path`."""
    task: dict[str, Any] | None = None
    """Its task, labels and head shapes (`task_record`), where the folder records them."""


def copy_tensors(plan: list[tuple[SiteAdapter, dict[str, torch.Tensor]]]) -> None:
    """Copy the checked tensors of a `copy_plan` into their adapter parts."""
    for adapter, loaded in plan:
        adapter.load_file_state(loaded)


def copy_plan(
    delta_model: DeltaModel, name: str, read: ReadAdapter
) -> list[tuple[SiteAdapter, dict[str, torch.Tensor]]]:
    """(adapter part, its tensors from the file) for every part of adapter `name`, once the file is checked to
    hold exactly the adapter's tensors with the right shapes, finite and of the right kind."""
    plan: list[tuple[SiteAdapter, dict[str, torch.Tensor]]] = []
    used: set[str] = set()
    for module_name, site in delta_model.sites():
        if name not in site.adapters:
            continue
        adapter = site.adapters[name]
        loaded = {}
        for tensor_name, current in adapter.file_state().items():
            file_key = read.layout.tensor_key(module_name, adapter, tensor_name)
            if file_key not in read.tensors:
                raise AdapterShapeError(
                    f"{read.source} has no tensor {file_key!r} that this model needs; the adapter was made for "
                    "another model (or with another config)"
                )
            stored = read.tensors[file_key]
            if stored.shape != current.shape:
                raise AdapterShapeError(
                    f"{file_key}: the file holds shape {tuple(stored.shape)}, the model needs "
                    f"{tuple(current.shape)}; the adapter was made for a model of another shape"
                )
            _check_kind(read.source, file_key, stored, current)
            loaded[tensor_name] = stored.to(dtype=current.dtype, device=current.device)
            _check_finite(read.source, file_key, stored, loaded[tensor_name])
            used.add(file_key)
        plan.append((adapter, loaded))
    extra = sorted(set(read.tensors) - used)
    if extra:
        raise AdapterShapeError(
            f"{read.source} holds {len(extra)} tensor(s) this model has no place for, first {extra[0]!r}; the "
            "adapter was made for another model"
        )
    return plan


def non_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a float tensor holding NaN or ±inf (one read of it)."""
    return tensor.is_floating_point() and not _all_finite(tensor)


def _check_kind(source: Path, file_key: str, stored: torch.Tensor, current: torch.Tensor) -> None:
    """Refuse a stored tensor that is not of the model part's kind (an int64 or bool tensor where the part is
    float, or the reverse): a cast would invent values."""
    if stored.is_floating_point() != current.is_floating_point():
        raise AdapterFileError(
            f"{source}: tensor {file_key!r} is {_dtype_name(stored)} and the model's part is {_dtype_name(current)}; "
            "the file is damaged or was not written for this adapter, so nothing was loaded"
        )


def _check_finite(source: Path, file_key: str, stored: torch.Tensor, cast: torch.Tensor) -> None:
    """Refuse a tensor that would hold NaN or ±inf in the model: what the model part would store (`cast`, the
    file's tensor in the part's dtype) is checked, so a finite float32 value beyond float16's range (65504),
    which the cast makes ±inf, is refused as a NaN in the file is."""
    if not non_finite(cast):
        return
    if non_finite(stored):
        raise AdapterFileError(
            f"{source}: tensor {file_key!r} holds non-finite values (NaN or inf), so nothing was loaded; the run that "
            "trained it likely diverged (or the file is damaged): train it again with a lower learning rate"
        )
    largest = stored.abs().max().item()
    raise AdapterFileError(
        f"{source}: tensor {file_key!r} holds values up to {largest:.4g} in magnitude, beyond {_dtype_name(cast)}'s "
        f"range, so it would be inf in this model and nothing was loaded; load it onto a float32 model"
    )


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
