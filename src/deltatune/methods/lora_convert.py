"""A PiSSA or OLoRA adapter as the plain LoRA of rank 2r that peft's conversion writes.

The adapter's change of W is ΔW = s (B A − B₀A₀) = s [B, −B₀] [A; A₀] (`lora_init`), so the plain LoRA
A' = [A; A₀] (2r × in), B' = [B, −B₀] (out × 2r) with the same scale s is the same function on the
original base. The scale is kept by doubling the rank and multiplying lora_alpha by 2 (rsLoRA: by √2,
since s = α/√r), and every `rank_pattern` / `alpha_pattern` value likewise. This is peft's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`, which writes the same tensors
and config; peft refuses rsLoRA with patterns, where the rule above still keeps each module's scale.
Here the result is a new adapter of the model: it saves in either format, loads on the original base
(no recomputation), merges and serves mixed batches like any LoRA.

KaSA (`lora_kasa`) converts the same way, which peft does not offer: ΔW = s B diag(ΔΣ) A − D with
D = B₀A₀, so A' = [diag(ΔΣ) A; A₀], B' = [B, −B₀/s].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import DeltaTuneError
from .lora import LoraConfig
from .lora_init import LoraResidualLinear

if TYPE_CHECKING:
    from ..model import DeltaModel


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA with the same scale at every module as `config`."""
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={pattern: 2 * rank for pattern, rank in config.rank_pattern.items()},
        alpha_pattern={pattern: alpha_factor * alpha for pattern, alpha in config.alpha_pattern.items()},
        init_lora_weights=True,
        kasa_config=None,
        monteclora_config=None,  # the same function outside training; a sampler of rank r has no rank-2r form
    )


def to_plain_lora(delta_model: DeltaModel, name: str, new_name: str, trainable: bool = False) -> None:
    """Add `new_name`: adapter `name` (made with a base-rewriting init, "pissa" or "olora", or KaSA) as the plain
    LoRA of rank 2r that is the same function on the original base (see the module docstring)."""
    delta_model.require([name])
    config = delta_model.configs[name]
    layers = {module_name: site.adapters[name] for module_name, site in delta_model.sites() if name in site.adapters}
    if not isinstance(config, LoraConfig) or not all(
        isinstance(layer, LoraResidualLinear) for layer in layers.values()
    ):
        raise DeltaTuneError(
            f"to_plain_lora converts LoRA adapters made with init_lora_weights 'pissa', 'pissa_niter_<K>' or "
            f"'olora', or with kasa_config; {name!r} is already a plain adapter, save it as it is"
        )
    devices = sorted({p.device.index or 0 for p in delta_model.base_model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the new adapter's own init is overwritten: it draws nothing
        delta_model.add(new_name, plain_lora_config(config), trainable=trainable, weights_from_file=True)
    try:
        for module_name, site in delta_model.sites():
            if module_name in layers:
                layer, current = layers[module_name], site.adapters[new_name].file_state()
                lora_A = torch.cat([layer.down_projection().detach(), layer.lora_A0], dim=0)
                initial_B = layer.lora_B0 * (layer.initial_scale() / layer.scaling)  # s B'A' = s B A − initial term
                lora_B = torch.cat([layer.lora_B.detach(), -initial_B], dim=1)
                site.adapters[new_name].load_file_state(
                    {"lora_A": lora_A.to(current["lora_A"].dtype), "lora_B": lora_B.to(current["lora_B"].dtype)}
                )
    except BaseException:
        delta_model.delete(new_name)
        raise
