"""AdapterHub's prefix tuning in its files: the config fields and tensor names of a `PrefixTuningConfig`
part (MAM's), both ways.

AdapterHub keeps one prefix module per adapter in a pool on the base model and saves it under
`<base>.prefix_tuning.prefix_tunings.NAME.self_prefix.<tensor>` (and once more under every attention
layer that references it, `<layer>.prefix_tuning.pool.prefix_tunings...`: the same tensors). Its MLP
(`flat=False`) is `wte` (Embedding(n, hidden)) → `control_trans.0` → tanh → `control_trans.2`, ours
`source.embedding` → `source.mlp.0` → tanh → `source.mlp.2`; a flat prefix is one vector `control_trans`
of n × (layers · 2 · kv_heads · head_dim), row by row our table `source.weight`. A gated prefix
(`use_gating`) has a gate per attention layer, `<layer>.prefix_tuning.prefix_gates.NAME.weight` / `.bias`:
ours is `<layer>.gate`.

On an encoder-decoder (T5) AdapterHub builds a prefix per kind of attention, under its location key
(`encoder_prefix`, `self_prefix`, `cross_prefix`), with its pool on the top model (`prefix_tuning.prefix_tunings.
NAME.LOCATION.<tensor>`, which its own saves put into the head's file, leaving the adapter's file with the
layers' copies). Ours are joined at the attention modules (`methods/prefix_joined.py`), each location's table
held by its first attention module: `encoder.block.0.layer.0.SelfAttention.source.<tensor>`. A folder is read
from whichever copy it has; ours are written as the pool's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapterhub_options import refuse_other_options
from .errors import AdapterFileError
from .methods.prefix_joined import location_holders
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.soft_prompt import find_stacks

LOCATION = "self_prefix"
"""AdapterHub's location key of self-attention prefixes (decoder-only and encoder models)."""
POOL_MARKER = ".prefix_tuning.prefix_tunings."
"""In the keys of the pool's own copy of a prefix (a layer's copy has `.prefix_tuning.pool.prefix_tunings.`;
on the top model the pool's keys start `prefix_tuning.prefix_tunings.`)."""
TUNINGS_MARKER = "prefix_tunings."
"""In the keys of every copy of a prefix: the pool's (on the top model's pool too), a layer's."""
GATE_MARKER = ".prefix_tuning.prefix_gates."
TENSOR_NAMES = {
    "wte.weight": "source.embedding.weight",
    "control_trans.0.weight": "source.mlp.0.weight",
    "control_trans.0.bias": "source.mlp.0.bias",
    "control_trans.2.weight": "source.mlp.2.weight",
    "control_trans.2.bias": "source.mlp.2.bias",
    "control_trans": "source.weight",
}
"""AdapterHub's prefix tensor → ours."""

FIXED_OPTIONS = {"non_linearity": "tanh", "dropout": 0.0, "leave_out": []}
"""AdapterHub prefix option: the value our prefix tuning implements (anything else is refused)."""


def prefix_config_from_adapterhub(options: dict[str, Any], folder: Path) -> PrefixTuningConfig:
    """Our `PrefixTuningConfig` in AdapterHub's form for its prefix-tuning config dict."""
    refuse_other_options(options, FIXED_OPTIONS, folder, "prefix")
    flat = bool(options.get("flat", False))
    return PrefixTuningConfig(
        num_virtual_tokens=options.get("prefix_length", 30),
        prefix_projection=not flat,
        encoder_hidden_size=None if flat else options.get("bottleneck_size", 512),
        embedding_dim=None if flat else "hidden_size",
        shift_positions=False,
        use_gating=bool(options.get("use_gating", False)),
        shared_gating=bool(options.get("shared_gating", True)),
        encoder_prefix=bool(options.get("encoder_prefix", True)),
        cross_prefix=bool(options.get("cross_prefix", True)),
    )


def prefix_config_to_adapterhub(config: PrefixTuningConfig, hidden_size: int) -> dict[str, Any]:
    """AdapterHub's prefix-tuning config dict for ours on a model of `hidden_size`; refused where AdapterHub
    computes another prefix. Its `bottleneck_size` is the width of the MLP we write (ours defaults to the hidden
    size, AdapterHub's to 512), so that both libraries build the MLP the file holds."""
    if config.shift_positions or (config.prefix_projection and config.embedding_dim != "hidden_size"):
        raise AdapterFileError(
            "AdapterHub's prefix tuning keeps real positions and reads the model's hidden size; this prefix has "
            f"shift_positions={config.shift_positions}, embedding_dim={config.embedding_dim!r}: save it in "
            "deltatune's format"
        )
    return {
        "architecture": "prefix_tuning",
        "encoder_prefix": config.encoder_prefix,
        "cross_prefix": config.cross_prefix,
        "flat": not config.prefix_projection,
        "prefix_length": config.num_virtual_tokens,
        "bottleneck_size": config.encoder_hidden_size or hidden_size,
        "init_weights_seed": None,
        "use_gating": config.use_gating,
        "shared_gating": config.shared_gating,
        **FIXED_OPTIONS,
    }


def prefix_tensors(
    tensors: dict[str, torch.Tensor], name: str, model: nn.Module, config: PrefixTuningConfig, folder: Path
) -> dict[str, torch.Tensor]:
    """Our file keys for the prefix tensors of adapter `name` in an AdapterHub weights dict."""
    stacks = find_stacks(model, config)
    if stacks.decoder is None:
        holders, marker = {LOCATION: stacks.cache_stack}, POOL_MARKER
    else:  # any copy: the pool's on the top model, or a layer's
        holders = {location.value: holder for location, holder in location_holders(model, stacks).items()}
        marker = TUNINGS_MARKER
    ours = {}
    for key, tensor in tensors.items():
        if GATE_MARKER + name + "." in key:
            layer, tensor_name = key.split(GATE_MARKER + name + ".")
            ours[f"{layer}.gate.{tensor_name}"] = tensor
            continue
        if not is_prefix_key(key, name):
            raise AdapterFileError(f"{folder}: tensor {key!r} is not part of a prefix {name!r} that deltatune can load")
        if marker + name + "." not in key:
            continue  # a layer's copy of the pool's prefix
        location, tensor_name = key.split(marker + name + ".", 1)[1].split(".", 1)
        if location not in holders or tensor_name not in TENSOR_NAMES:
            raise AdapterFileError(f"{folder}: prefix tensor {key!r} is not one deltatune can load")
        if tensor_name == "control_trans":
            if tensor.numel() % config.num_virtual_tokens:
                raise AdapterFileError(
                    f"{folder}: prefix tensor {key!r} holds {tensor.numel()} values, not a whole number of rows for "
                    f"its {config.num_virtual_tokens} virtual tokens"
                )
            tensor = tensor.reshape(config.num_virtual_tokens, -1)
        ours.setdefault(f"{holders[location]}.{TENSOR_NAMES[tensor_name]}", tensor)
    return ours


def is_prefix_key(key: str, name: str) -> bool:
    """Whether `key` holds a part of adapter `name`'s prefix (the pool's copy or a layer's)."""
    return any(marker + name + "." in key for marker in (TUNINGS_MARKER, GATE_MARKER))


def gate_key(layer: str, tensor_name: str, name: str) -> str:
    """AdapterHub's key of our prefix gate's tensor `tensor_name` ("gate.weight") at attention layer `layer`."""
    return f"{layer}{GATE_MARKER}{name}.{tensor_name.removeprefix('gate.')}"


def prefix_key(base: str, tensor_name: str, name: str, location: str = LOCATION) -> str | None:
    """AdapterHub's key of our prefix tensor `tensor_name` in the pool held at `base` ("" for the top model),
    at `location`; None for none of its tensors."""
    theirs = {ours: theirs for theirs, ours in TENSOR_NAMES.items()}.get(tensor_name)
    pool = f"{base}{POOL_MARKER}" if base else POOL_MARKER.removeprefix(".")
    return None if theirs is None else f"{pool}{name}.{location}.{theirs}"
