"""Writing AdapterHub adapter folders: `save(path, format="adapterhub")` for bottleneck, LoRA (plain LoRA
on the self-attention matrices of every layer, `adapterhub_lora`), prefix-tuning (AdapterHub's form), MAM
and UniPELT adapters.

The folder is what AdapterHub's `save_adapter(..., use_safetensors=True)` writes and its
`load_adapter(path, use_safetensors=True)` reads: `adapter_config.json` ({"config", "name", "model_type",
"model_class", "hidden_size", ...}; a composed adapter's config is a union {"architecture": "union",
"configs": [...]}: MAM's prefix tuning and bottleneck, UniPELT's and LoRA) and `adapter.safetensors` under
AdapterHub's keys, the inverse of `adapterhub_format`'s reading. A prefix is written once, as its pool's
copy; AdapterHub's layers reference that module, so it does not need the per-layer copies its own saves
repeat. Other methods (and Compacter, whose PHM layers AdapterHub names otherwise) are refused: save them
in deltatune's format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import adapterhub_reft
from .adapterhub_format import FIXED_OPTIONS, INITS, sublayer_module
from .adapterhub_lora import MARKER as LORA_MARKER
from .adapterhub_lora import lora_config_to_adapterhub
from .adapterhub_prefix import gate_key, prefix_config_to_adapterhub, prefix_key
from .architectures import sublayer_output_width
from .errors import UnsupportedFormatError
from .methods.bottleneck import BottleneckAdapter, BottleneckConfig, placed_sites
from .methods.lora import LoraLinear, LoraQuantizedLinear
from .methods.lora_config import LoraConfig
from .methods.lora_fused import FusedSliceLora, GatedFusedSliceLora
from .methods.lora_gating import GatedLoraLinear
from .methods.lora_init import LoraOrthogonalLinear
from .methods.mam import MAMConfig
from .methods.prefix_gating import GatedPrefixReinsert
from .methods.prefix_joined import JoinedPrefix
from .methods.prefix_tuning import PrefixCache, PrefixTuningConfig
from .methods.soft_prompt import PromptTable
from .methods.unipelt import UniPELTConfig
from .site_adapter import SiteAdapter
from .version import __version__

if TYPE_CHECKING:
    from .model import DeltaModel

WEIGHTS_FILE = "adapter.safetensors"
LOCATIONS = {"attention": ("attention.output", "attention_adapters"), "ffn": ("output", "output_adapters")}
"""A sublayer kind → AdapterHub's location in the block: the sublayer's own output module (BERT's
`output`, `attention.output`), or the module AdapterHub adds to the block."""
SUBLAYER_MODULES = frozenset({"t5", "mt5"})
"""Model types whose sublayers are modules of their own that AdapterHub's adapters sit in (T5's `layer.N`)."""


class AdapterHubLayout:
    """AdapterHub's keys for the tensors of one adapter named `name`."""

    weights_file = WEIGHTS_FILE

    def __init__(self, name: str, locations: dict[str, str], pool: str = "") -> None:
        self.name = name
        self.locations = locations
        """Our output module of each bottleneck site → AdapterHub's module path of its adapters."""
        self.pool = pool
        """The module holding AdapterHub's prefix pool on an encoder-decoder: its base model ("" for T5's own)."""

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        if isinstance(adapter, JoinedPrefix) and not tensor_name.startswith("gate."):
            return prefix_key(self.pool, _source_tensor(tensor_name), self.name, adapter.location.value)
        if isinstance(adapter, PrefixCache):
            return prefix_key(module_name, _source_tensor(tensor_name), self.name)
        if isinstance(adapter, GatedPrefixReinsert | JoinedPrefix):
            return gate_key(module_name, tensor_name, self.name)
        if isinstance(adapter, LoraLinear):
            return f"{module_name}{LORA_MARKER}{self.name}.{tensor_name}"
        role, rest = tensor_name.split(".", 1)
        theirs = {"down": "adapter_down.0", "up": "adapter_up"}.get(role, role)  # and the gate's own name
        return f"{self.locations[module_name]}.adapters.{self.name}.{theirs}.{rest}"

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        state = adapter.file_state()
        if isinstance(getattr(adapter, "source", None), PromptTable):  # a flat prefix: one vector, row by row
            return {**state, "control_trans": state.pop("source.weight").reshape(-1)}
        return state


def _source_tensor(tensor_name: str) -> str:
    """Our name of a prefix holder's tensor as `file_state` gives it (a flat prefix's `control_trans`)."""
    return "source.weight" if tensor_name == "control_trans" else tensor_name


OTHER_WRITERS = {"reft": adapterhub_reft.adapter_files}
"""Methods whose AdapterHub folders another module writes: method name → its `adapter_files`."""


def adapter_files(delta_model: DeltaModel, name: str) -> tuple[dict[str, Any], Any]:
    """AdapterHub's `adapter_config.json` data for adapter `name`, and the layout of its weights file
    (a ReFT adapter's from `adapterhub_reft`, whose folders AdapterHub lays out apart)."""
    config = delta_model.configs[name]
    if config.method in OTHER_WRITERS:
        return OTHER_WRITERS[config.method](delta_model, name)
    model = delta_model.base_model
    fields = PARTS.get(type(config))
    if fields is None:
        raise UnsupportedFormatError(
            "deltatune writes AdapterHub folders for bottleneck, LoRA, prefix-tuning, MAM, UniPELT and ReFT adapters; "
            f"{name!r} is a {config.method} adapter: save it with format='deltatune'"
        )
    if config.modules_to_save:
        raise UnsupportedFormatError(
            f"AdapterHub's adapter folders hold no modules_to_save ({config.modules_to_save}); save {name!r} with "
            "format='deltatune'"
        )
    locations: dict[str, str] = {}
    parts = [config if field is None else getattr(config, field) for field in fields]
    options = [PART_WRITERS[type(part)](part, delta_model, name, locations) for part in parts]
    _check_adapters_written(delta_model, name)
    model_config = model.config
    data = {
        "config": options[0] if len(options) == 1 else {"architecture": "union", "configs": options},
        "hidden_size": model_config.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "name_or_path", "") or "",
        "model_type": model_config.model_type,
        "name": name,
        "version": f"deltatune.{__version__}",
    }
    names = {id(module): module_name for module_name, module in model.named_modules()}
    return data, AdapterHubLayout(name, locations, names.get(id(getattr(model, "base_model", model)), ""))


def _bottleneck_part(config: BottleneckConfig, delta_model: DeltaModel, name: str, locations: dict) -> dict:
    model = delta_model.base_model
    sites = placed_sites(model, config)
    locations.update({site.output: _location(site, model) for site in sites})
    return bottleneck_config_to_adapterhub(config, sublayer_output_width(model, model.get_submodule(sites[0].output)))


def _prefix_part(config: PrefixTuningConfig, delta_model: DeltaModel, name: str, locations: dict) -> dict:
    return prefix_config_to_adapterhub(config, delta_model.base_model.config.hidden_size)


def _lora_part(config: LoraConfig, delta_model: DeltaModel, name: str, locations: dict) -> dict:
    return lora_config_to_adapterhub(config, delta_model, name)


PARTS: dict[type, tuple[str | None, ...]] = {
    BottleneckConfig: (None,),
    LoraConfig: (None,),
    PrefixTuningConfig: (None,),
    MAMConfig: ("prefix_tuning", "adapter"),
    UniPELTConfig: ("prefix_tuning", "adapter", "lora"),
}
"""Our config → the fields holding its parts, in AdapterHub's order (None: the config is the one part)."""
PART_WRITERS = {BottleneckConfig: _bottleneck_part, LoraConfig: _lora_part, PrefixTuningConfig: _prefix_part}
"""A part's config type → its AdapterHub config dict (Compacter's subclass is not one of them)."""


def bottleneck_config_to_adapterhub(config: BottleneckConfig, hidden: int) -> dict[str, Any]:
    """AdapterHub's `BnConfig` dict for our bottleneck config (`hidden`: the sublayers' width)."""
    size = config.size_for(hidden)
    if hidden % size:
        raise UnsupportedFormatError(
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
        "use_gating": config.use_gating,
        "adapter_residual_before_ln": False,
        "phm_layer": False,
    }


def _location(site: Any, model: torch.nn.Module) -> str:
    if getattr(model.config, "model_type", None) in SUBLAYER_MODULES:
        return f"{site.block}.{sublayer_module(site)}"
    own, added = LOCATIONS[site.kind]
    block = model.get_submodule(site.block)
    try:
        block.get_submodule(own)
    except AttributeError:
        return f"{site.block}.{added}"
    return f"{site.block}.{own}"


WRITTEN = {
    BottleneckAdapter,
    PrefixCache,
    GatedPrefixReinsert,
    JoinedPrefix,
    LoraLinear,
    LoraQuantizedLinear,
    LoraOrthogonalLinear,
    GatedLoraLinear,
    FusedSliceLora,
    GatedFusedSliceLora,
}
"""The site adapters with tensors that AdapterHub's format names, by exact type: a subclass computes
something else (PiSSA's residual, KaSA, BD-LoRA, MiCA) and must be named here to be written."""


def _check_adapters_written(delta_model: DeltaModel, name: str) -> None:
    """Every site adapter with tensors is one this writer names (a bottleneck, a prefix holder, a LoRA layer)."""
    for module_name, site in delta_model.sites():
        adapter = site.adapters[name] if name in site.adapters else None
        if adapter is not None and adapter.file_state() and type(adapter) not in WRITTEN:
            raise UnsupportedFormatError(
                f"{module_name} holds a {type(adapter).__name__} that AdapterHub's format has no place for; save "
                "with format='deltatune'"
            )
