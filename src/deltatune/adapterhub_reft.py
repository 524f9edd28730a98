"""ReFT folders in AdapterHub's layout, read and written (`adapterhub_format` dispatches here).

AdapterHub's `adapter_config.json` holds {"config": {"architecture": "reft", "layers", "prefix_positions",
"suffix_positions", "r", "orthogonality", "tied_weights", "dropout", "non_linearity", "dtype",
"output_reft", "init_weights_seed"}, "name", "model_type", "model_class", "hidden_size", "version"}; the
tensors are `<block>.reft_layer.refts.<name>.units.<i>.<tensor>` with tensors `learned_source.weight`,
`learned_source.bias` and `projection.weight`, or for an orthogonal R
`projection.parametrizations.weight.original` and `projection.parametrizations.weight.0.base` (torch's
parametrization; the signs we keep apart are the diagonal of `original`).

AdapterHub keeps `subtract_projection` as a class attribute of its configs, not a field: it neither saves
it nor keeps it on load (its `add_adapter` rebuilds the config from its fields), so a DiReFT folder it
saved reloads there, and here, with the projection subtracted. We read a missing key as True, as
AdapterHub does, and refuse to write an adapter with `subtract_projection=False` in its layout, which
AdapterHub would run as NoReFT. We write `adapter.safetensors`: load it with
`model.load_adapter(path, use_safetensors=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .architectures import block_names
from .errors import AdapterFileError, DeltaTuneError
from .methods.reft import ReftConfig, ReftIntervention
from .site_adapter import SiteAdapter
from .version import __version__

if TYPE_CHECKING:
    from .model import DeltaModel

FIELDS = (
    "layers",
    "prefix_positions",
    "suffix_positions",
    "r",
    "orthogonality",
    "tied_weights",
    "subtract_projection",
    "dropout",
    "non_linearity",
    "init_weights_seed",
)
"""Config keys that AdapterHub and `ReftConfig` share, one to one."""
FIXED = {"architecture": "reft", "dtype": None, "output_reft": True}
"""AdapterHub keys with the one value we implement (float32 interventions, on block outputs)."""
TENSOR_NAMES = {
    "projection.original": "projection.parametrizations.weight.original",
    "projection.base": "projection.parametrizations.weight.0.base",
}
"""Our tensor name → AdapterHub's (the rest are the same)."""
WEIGHTS_FILE = "adapter.safetensors"


def config_from_adapterhub(options: dict[str, Any], folder: Path) -> ReftConfig:
    """Our `ReftConfig` for AdapterHub's; an option we do not implement is refused by name."""
    for option, value in FIXED.items():
        if options.get(option, value) != value:
            raise AdapterFileError(
                f"{folder}: AdapterHub ReFT option {option}={options[option]!r} is not supported (deltatune "
                f"implements {option}={value!r})"
            )
    unknown = sorted(set(options) - set(FIELDS) - set(FIXED))
    if unknown:
        raise AdapterFileError(f"{folder}: AdapterHub ReFT options {unknown} are not known to deltatune")
    try:
        return ReftConfig(**{key: options[key] for key in FIELDS if key in options})
    except DeltaTuneError as error:
        raise AdapterFileError(f"{folder}: {error}") from error


def read_tensors(tensors: dict[str, torch.Tensor], name: str, model: nn.Module, folder: Path) -> dict:
    """AdapterHub's tensors under our file keys (`<block>.units.<i>.<tensor>`), signs from the diagonal."""
    blocks = block_names(model)
    marker = f".reft_layer.refts.{name}."
    theirs_to_ours = {theirs: ours for ours, theirs in TENSOR_NAMES.items()}
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if marker not in key:
            raise AdapterFileError(f"{folder}: tensor {key!r} is not part of a ReFT adapter {name!r}")
        prefix, rest = key.split(marker)
        units, unit, tensor_name = (rest.split(".", 2) + ["", ""])[:3]
        if units != "units" or not unit.isdigit():
            raise AdapterFileError(f"{folder}: tensor {key!r} is not a tensor of a ReFT unit")
        unit_key = f"{_our_block(prefix, blocks, folder)}.units.{unit}"
        tensor_name = theirs_to_ours.get(tensor_name, tensor_name)
        ours[f"{unit_key}.{tensor_name}"] = tensor
        if tensor_name == "projection.original":
            ours[f"{unit_key}.projection.signs"] = tensor.diagonal().int().to(tensor.dtype)
    return ours


def _our_block(prefix: str, blocks: list[str], folder: Path) -> str:
    """Our block for AdapterHub's module path: the same path, or one that ends with the other (a folder
    saved from another head class of the same model)."""
    found = [
        block for block in blocks if block == prefix or block.endswith("." + prefix) or prefix.endswith("." + block)
    ]
    if len(found) != 1:
        raise AdapterFileError(
            f"{folder}: no single block of this model for AdapterHub module {prefix!r}; was the adapter saved for "
            "another architecture?"
        )
    return found[0]


class AdapterHubReftLayout:
    """Our ReFT adapter `name` in AdapterHub's weights file."""

    weights_file = WEIGHTS_FILE

    def __init__(self, name: str) -> None:
        self.name = name

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        _, unit, rest = tensor_name.split(".", 2)
        return f"{module_name}.reft_layer.refts.{self.name}.units.{unit}.{TENSOR_NAMES.get(rest, rest)}"

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        if not isinstance(adapter, ReftIntervention):
            return {}
        state = {}
        for key, tensor in adapter.file_state().items():
            if key.endswith("projection.signs"):
                continue
            if key.endswith("projection.original"):
                signs = adapter.file_state()[key.replace("original", "signs")]
                tensor = tensor.clone()
                tensor.diagonal().copy_(signs)
            state[key] = tensor
        return state


def adapter_files(delta_model: DeltaModel, name: str) -> tuple[dict[str, Any], AdapterHubReftLayout]:
    """(AdapterHub's `adapter_config.json` data, the weights layout) of ReFT adapter `name` (`adapterhub_writer`
    sends ReFT adapters here)."""
    config = delta_model.configs[name]
    if not config.subtract_projection:
        raise DeltaTuneError(
            f"{name!r} has subtract_projection=False (DiReFT), which AdapterHub 1.3 drops when it loads a folder "
            "(it would run the adapter with R h subtracted); save it with format='deltatune'"
        )
    model_config = getattr(delta_model.base_model, "config", None)
    data = {
        "config": {**{key: getattr(config, key) for key in FIELDS}, **FIXED},
        "hidden_size": getattr(model_config, "hidden_size", None),
        "model_class": type(delta_model.base_model).__name__,
        "model_name": getattr(model_config, "name_or_path", "") or "",
        "model_type": getattr(model_config, "model_type", None),
        "name": name,
        "version": f"deltatune.{__version__}",
    }
    return data, AdapterHubReftLayout(name)
