"""AdapterHub's LoRA in its files (a `LoRAConfig`, alone or as UniPELT's part), read into our `LoraConfig`
and written from it.

AdapterHub adapts the attention matrices its `attn_matrices` letters name ("q", "k", "v"; on T5 those of
the cross-attention too, which our suffixes "q", "k", "v" match as well) and keeps
each layer's factors under `<layer>.loras.NAME.lora_A` (r × in), `lora_B` (out × r) and, with
`use_gating`, `gate.weight` / `gate.bias`: our `lora_A`, `lora_B` and `gate` at the same layer. On a model
whose q, k and v are thirds of one fused projection (GPT-2's `c_attn`, AdapterHub's merged linear) the letters
pick the thirds, each with its own rank-r pair and gate head: our LoRA with `fused_slices` on that layer
(`methods/lora_fused.py`), whose stacked factors are AdapterHub's tensors as they are.

Its config records r, α, dropout, the gate and the letters, and nothing else: every layer's matrices, one
scale α/r, y = W x + (α/r) B A x. A LoRA of ours is written only when that is what it computes and all it
holds (`lora_config_to_adapterhub`); rsLoRA's α/√r, a start that rewrites W (PiSSA, OLoRA, CorDA, KaSA),
extra tensors or frozen factors (MonteCLoRA, VeLoRA, BD-LoRA, MiCA) and layers left out would each load,
in AdapterHub or here, as another model, so they are refused and nothing is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapterhub_options import refuse_other_options
from .errors import AdapterFileError, UnsupportedFormatError
from .methods.lora import LoraAdapter
from .methods.lora_config import LoraConfig
from .registry import method_for

if TYPE_CHECKING:
    from .model import DeltaModel

ATTENTION_MATRICES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
    "mistral": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
    "bert": {"q": "query", "k": "key", "v": "value"},
    "roberta": {"q": "query", "k": "key", "v": "value"},
    **dict.fromkeys(("t5", "mt5"), {"q": "q", "k": "k", "v": "v"}),  # self- and cross-attention alike
}
"""Model type → AdapterHub's attention-matrix letters → our module names (suffixes)."""
FUSED_ATTENTION = {"gpt2": "c_attn"}
"""Model type → its fused projection whose output holds q, k and v as thirds, in that order (a suffix)."""
LETTERS = "qkv"
FIXED_OPTIONS = {
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "composition_mode": "add",
    "use_dora": False,
    "leave_out": [],
    "vera_d": None,
    "vera_b": None,
}
"""AdapterHub LoRA option: the value deltatune reads (anything else is refused)."""
MARKER = ".loras."
WRITTEN_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_gating": "use_gating"}
"""Our `LoraConfig` field → the AdapterHub LoRA option that records it."""
PLACEMENT_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fused_slices")
"""Fields that pick the layers: judged by the layers they picked, which must be all AdapterHub's letters
name (`_check_every_layer`)."""
START_FIELDS = ("init_lora_weights", "eva_config")
"""Fields that choose only where the factors start (the saved factors have overtaken it), for `STARTS`."""
STARTS = ("gaussian", "orthogonal", "eva", "loftq")
"""`init_lora_weights` strings that start plain factors, as True and False do; the other strings rewrite W
(PiSSA, OLoRA, CorDA) or freeze a factor (MiCA)."""


def lora_config_from_adapterhub(options: dict[str, Any], model: nn.Module, folder: Path) -> LoraConfig:
    """Our `LoraConfig` for AdapterHub's LoRA config dict on `model`."""
    refuse_other_options(options, FIXED_OPTIONS, folder, "LoRA")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ATTENTION_MATRICES and model_type not in FUSED_ATTENTION:
        raise AdapterFileError(
            f"{folder}: deltatune reads AdapterHub LoRA on {sorted({*ATTENTION_MATRICES, *FUSED_ATTENTION})} models, "
            f"not on {model_type!r}"
        )
    letters = list(options.get("attn_matrices", ["q", "v"]))
    if not letters or set(letters) - set(LETTERS):
        raise AdapterFileError(f"{folder}: AdapterHub LoRA attn_matrices {letters} must be among 'q', 'k', 'v'")
    if model_type in FUSED_ATTENTION:
        fused = FUSED_ATTENTION[model_type]
        placement = {"target_modules": [fused], "fused_slices": {fused: [letter in letters for letter in LETTERS]}}
    else:
        placement = {"target_modules": [ATTENTION_MATRICES[model_type][letter] for letter in letters]}
    return LoraConfig(
        r=options.get("r", 8),
        lora_alpha=options.get("alpha", 8),
        lora_dropout=options.get("dropout", 0.0),
        use_gating=bool(options.get("use_gating", False)),
        **placement,
    )


def is_lora_key(key: str, name: str) -> bool:
    return f"{MARKER}{name}." in key


def lora_tensors(tensors: dict[str, torch.Tensor], name: str, folder: Path) -> dict[str, torch.Tensor]:
    """Our file keys (`<layer>.<tensor>`) for the LoRA tensors of adapter `name` in AdapterHub's weights `tensors`,
    which must hold nothing else: a tensor the config does not describe is refused by name (as the bottleneck
    and ReFT readers refuse one), since dropping it would load a smaller adapter than the file holds."""
    marker = f"{MARKER}{name}."
    ours = {}
    for key, tensor in tensors.items():
        if marker not in key:
            raise AdapterFileError(
                f"{folder}: tensor {key!r} is not part of a LoRA adapter {name!r} that deltatune can load"
            )
        ours[key.replace(marker, ".")] = tensor
    return ours


def lora_config_to_adapterhub(config: LoraConfig, delta_model: DeltaModel, name: str) -> dict[str, Any]:
    """AdapterHub's `LoRAConfig` dict for our LoRA adapter `name` (alone or UniPELT's part); a LoRA it
    cannot express is refused (see the module docstring)."""
    model = delta_model.base_model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedFormatError(
            f"AdapterHub's folders are for transformers models (they record the model's config), and "
            f"{type(model).__name__} has no transformers config: save {name!r} with format='deltatune'"
        )
    placed = {
        module_name
        for module_name, site in delta_model.sites()
        if isinstance(site.adapters[name] if name in site.adapters else None, LoraAdapter)
    }
    suffixes = sorted({module_name.rsplit(".", 1)[-1] for module_name in placed})
    chosen = _fused_letters(config, model_type, placed, suffixes, name)
    if chosen is None:
        letters = {module: letter for letter, module in ATTENTION_MATRICES.get(model_type, {}).items()}
        if not placed or any(suffix not in letters or config.slices_for(suffix) for suffix in suffixes):
            raise UnsupportedFormatError(
                f"AdapterHub's LoRA adapts self-attention matrices ({sorted(letters) or 'none for ' + model_type}); "
                f"{name!r} adapts {suffixes}: save it with format='deltatune'"
            )
        chosen = {letters[suffix] for suffix in suffixes}
    unrecorded = unrecorded_options(config)
    if unrecorded:
        raise UnsupportedFormatError(
            f"AdapterHub's LoRA config has no word for {', '.join(unrecorded)} (set in {name!r}), so the folder "
            "would load as another model: save it with format='deltatune'"
        )
    _check_every_layer(delta_model, name, placed, suffixes)
    return {
        **FIXED_OPTIONS,
        "architecture": "lora",
        **{theirs: getattr(config, ours) for ours, theirs in WRITTEN_FIELDS.items()},
        "attn_matrices": [letter for letter in LETTERS if letter in chosen],
        "init_weights": "lora",
        "init_weights_seed": None,
        "dtype": None,
    }


def _fused_letters(
    config: LoraConfig, model_type: str, placed: set[str], suffixes: list[str], name: str
) -> set[str] | None:
    """The letters of the thirds a LoRA on the model's fused q/k/v projection adapts (`FUSED_ATTENTION`), or
    None on a model without one. Only LoRA on thirds of that projection is AdapterHub's there."""
    fused = FUSED_ATTENTION.get(model_type)
    if fused is None:
        return None
    slices = {tuple(config.slices_for(module_name) or ()) for module_name in placed}
    if suffixes != [fused] or len(slices) != 1 or len(next(iter(slices))) != len(LETTERS):
        raise UnsupportedFormatError(
            f"AdapterHub's LoRA on {model_type} adapts thirds (q, k, v) of {fused}, each with its own factors; "
            f"{name!r} adapts {suffixes}: use fused_slices={{{fused!r}: [q, k, v as True or False]}} on {fused} "
            "alone, or save it with format='deltatune'"
        )
    return {letter for letter, enabled in zip(LETTERS, next(iter(slices))) if enabled}


def unrecorded_options(config: LoraConfig) -> list[str]:
    """The name of each option of `config` that AdapterHub's LoRA config does not record and that is not
    LoRA's default, and `init_lora_weights=<value>` for a start that rewrites W or freezes a factor."""
    defaults = LoraConfig()
    kept = {*WRITTEN_FIELDS, *PLACEMENT_FIELDS, *START_FIELDS}
    options = [
        field.name
        for field in dataclasses.fields(config)
        if field.name not in kept and getattr(config, field.name) != getattr(defaults, field.name)
    ]
    if not (isinstance(config.init_lora_weights, bool) or config.init_lora_weights in STARTS):
        options.append(f"init_lora_weights={config.init_lora_weights!r}")
    return options


def _check_every_layer(delta_model: DeltaModel, name: str, placed: set[str], suffixes: list[str]) -> None:
    """AdapterHub puts LoRA on the lettered matrices of every layer: `name` must sit on all of them."""
    read_back = LoraConfig(target_modules=suffixes)
    expected = set(method_for(read_back).select(delta_model.base_model, read_back))
    missing = sorted(expected - placed)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UnsupportedFormatError(
            f"AdapterHub's LoRA adapts {suffixes} in every layer, but {name!r} leaves out "
            f"{shown}: save it with format='deltatune'"
        )
