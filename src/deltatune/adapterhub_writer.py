"""Writing AdapterHub adapter folders: `save(path, format="adapterhub")` for bottleneck and MAM adapters.

The folder is what AdapterHub's `save_adapter(..., use_safetensors=True)` writes and its
`load_adapter(path, use_safetensors=True)` reads: `adapter_config.json` ({"config", "name", "model_type",
"model_class", "hidden_size", ...}; a MAM adapter's config is the union {"architecture": "union",
"configs": [prefix tuning, bottleneck]}) and `adapter.safetensors` under AdapterHub's keys, the inverse
of `adapterhub_format`'s reading. A prefix is written once, as its pool's copy; AdapterHub's layers
reference that module, so it does not need the per-layer copies its own saves repeat. Other methods
(and Compacter, whose PHM layers AdapterHub names otherwise) are refused: save them in deltatune's format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .adapterhub_format import FIXED_OPTIONS, INITS
from .adapterhub_prefix import prefix_config_to_adapterhub, prefix_key
from .architectures import sublayer_output_width
from .errors import DeltaTuneError
from .methods.bottleneck import BottleneckAdapter, BottleneckConfig, placed_sites
from .methods.mam import MAMConfig
from .methods.prefix_tuning import PrefixCache
from .methods.soft_prompt import PromptTable
from .site import SiteAdapter
from .version import __version__

if TYPE_CHECKING:
    from .model import DeltaModel

WEIGHTS_FILE = "adapter.safetensors"
LOCATIONS = {"attention": ("attention.output", "attention_adapters"), "ffn": ("output", "output_adapters")}
"""A sublayer kind → AdapterHub's location in the block: the sublayer's own output module (BERT's
`output`, `attention.output`), or the module AdapterHub adds to the block."""


class AdapterHubLayout:
    """AdapterHub's keys for the tensors of one adapter named `name`."""

    weights_file = WEIGHTS_FILE

    def __init__(self, name: str, locations: dict[str, str]) -> None:
        self.name = name
        self.locations = locations
        """Our output module of each bottleneck site → AdapterHub's module path of its adapters."""

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        if isinstance(adapter, PrefixCache):
            return prefix_key(
                module_name, "source.weight" if tensor_name == "control_trans" else tensor_name, self.name
            )
        role, rest = tensor_name.split(".", 1)
        theirs = {"down": "adapter_down.0", "up": "adapter_up"}[role]
        return f"{self.locations[module_name]}.adapters.{self.name}.{theirs}.{rest}"

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        state = adapter.file_state()
        if isinstance(adapter, PrefixCache) and isinstance(adapter.source, PromptTable):
            return {"control_trans": state["source.weight"].reshape(-1)}
        return state


def adapter_files(delta_model: DeltaModel, name: str) -> tuple[dict[str, Any], AdapterHubLayout]:
    """AdapterHub's `adapter_config.json` data for adapter `name`, and the layout of its weights file."""
    config = delta_model.configs[name]
    model = delta_model.base_model
    bottleneck = config.adapter if isinstance(config, MAMConfig) else config
    if type(bottleneck) is not BottleneckConfig:
        raise DeltaTuneError(
            f"deltatune writes AdapterHub folders for bottleneck and MAM adapters; {name!r} is a {config.method} "
            "adapter: save it with format='deltatune'"
        )
    if config.modules_to_save:
        raise DeltaTuneError(
            f"AdapterHub's adapter folders hold no modules_to_save ({config.modules_to_save}); save {name!r} with "
            "format='deltatune'"
        )
    sites = placed_sites(model, bottleneck)
    hidden = sublayer_output_width(model, model.get_submodule(sites[0].output))
    options = bottleneck_config_to_adapterhub(bottleneck, hidden)
    if isinstance(config, MAMConfig):
        options = {"architecture": "union", "configs": [prefix_config_to_adapterhub(config.prefix_tuning), options]}
    _check_adapters_written(delta_model, name)
    model_config = model.config
    data = {
        "config": options,
        "hidden_size": model_config.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "name_or_path", "") or "",
        "model_type": model_config.model_type,
        "name": name,
        "version": f"deltatune.{__version__}",
    }
    locations = {site.output: _location(site, model) for site in sites}
    return data, AdapterHubLayout(name, locations)


def bottleneck_config_to_adapterhub(config: BottleneckConfig, hidden: int) -> dict[str, Any]:
    """AdapterHub's `BnConfig` dict for our bottleneck config (`hidden`: the sublayers' width)."""
    size = config.size_for(hidden)
    if hidden % size:
        raise DeltaTuneError(
            f"AdapterHub sizes a bottleneck as hidden // reduction_factor; {size} does not divide the hidden size "
            f"{hidden}: choose a bottleneck_size that does, or save in deltatune's format"
        )
    return {
        **FIXED_OPTIONS,
        "mh_adapter": config.attention_adapter,
        "output_adapter": config.ffn_adapter,
        "is_parallel": config.parallel,
        "original_ln_before": config.original_ln_before,
        "reduction_factor": hidden // size,
        "non_linearity": config.non_linearity,
        "scaling": config.scaling,
        "init_weights": {ours: theirs for theirs, ours in INITS.items()}[config.init_weights],
        "dropout": config.dropout,
        "leave_out": list(config.leave_out),
        "adapter_residual_before_ln": False,
        "phm_layer": False,
    }


def _location(site: Any, model: torch.nn.Module) -> str:
    own, added = LOCATIONS[site.kind]
    block = model.get_submodule(site.block)
    try:
        block.get_submodule(own)
    except AttributeError:
        return f"{site.block}.{added}"
    return f"{site.block}.{own}"


def _check_adapters_written(delta_model: DeltaModel, name: str) -> None:
    """Every site adapter with tensors is one this writer names (a bottleneck or a prefix holder)."""
    for module_name, site in delta_model.sites():
        adapter = site.adapters[name] if name in site.adapters else None
        if adapter is not None and adapter.file_state() and not isinstance(adapter, (BottleneckAdapter, PrefixCache)):
            raise DeltaTuneError(
                f"{module_name} holds a {type(adapter).__name__} that AdapterHub's format has no place for; save "
                "with format='deltatune'"
            )
