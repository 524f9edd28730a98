"""A new LoRA adapter from a weighted combination of existing ones (peft's `add_weighted_adapter`).

At each module the target update is ΔW = Σ_i w_i s_i B_i A_i. The new adapter has scaling 1
(lora_alpha = rank, no rsLoRA), so its factors carry the scales:
- "cat" (exact): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]; rank = Σ r_i.
- "linear" (peft's; equal ranks): A = Σ sign_i √|w_i s_i| A_i, B = Σ √|w_i s_i| B_i. Not ΔW in
  general (cross terms), kept for compatibility with peft's results.
- "svd" (best rank-k approximation): ΔW = U S Vᵀ truncated to `svd_rank` (default max r_i);
  B = U_k S_k, A = V_kᵀ.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from ..errors import DeltaTuneError
from .lora import LoraAdapter, LoraConfig

if TYPE_CHECKING:
    from ..model import DeltaModel

COMBINATIONS = ("cat", "linear", "svd")


def combine_lora(
    delta_model: DeltaModel, adapters: list[str], weights: list[float], combination_type: str, svd_rank: int | None
) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config of the combined adapter and its tensors per module ({module: {"lora_A": A, "lora_B": B}}),
    which `DeltaModel.add_weighted_adapter` adds and copies in."""
    if combination_type not in COMBINATIONS:
        raise DeltaTuneError(f"unknown combination_type {combination_type!r}; use one of {COMBINATIONS}")
    if len(adapters) != len(weights) or not adapters:
        raise DeltaTuneError("pass one weight per adapter (and at least one adapter)")
    configs = [delta_model.configs[adapter] for adapter in adapters]
    if not all(isinstance(config, LoraConfig) for config in configs):
        raise DeltaTuneError("add_weighted_adapter combines LoRA adapters only")
    per_module = _factors_per_module(delta_model, adapters)
    new_factors = {
        module: _combine(pieces, weights, combination_type, svd_rank) for module, pieces in per_module.items()
    }
    ranks = {module: factors[0].shape[0] for module, factors in new_factors.items()}
    rank = max(ranks.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(module): r for module, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(module): r for module, r in ranks.items() if r != rank},
    )
    return config, {module: {"lora_A": lora_A, "lora_B": lora_B} for module, (lora_A, lora_B) in new_factors.items()}


def _factors_per_module(delta_model: DeltaModel, adapters: list[str]) -> dict[str, list[tuple[int, LoraAdapter]]]:
    """{module: [(index of the adapter, its LoRA layer)]} over the modules any of them adapts."""
    found: dict[str, list[tuple[int, LoraAdapter]]] = {}
    for module_name, site in delta_model.sites():
        for index, adapter in enumerate(adapters):
            if adapter in site.adapters and isinstance(site.adapters[adapter], LoraAdapter):
                found.setdefault(module_name, []).append((index, site.adapters[adapter]))
    return found


def _combine(
    pieces: list[tuple[int, LoraAdapter]], weights: list[float], combination_type: str, svd_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = [
        (weights[index] * layer.scaling, layer.lora_A.detach().float(), layer.lora_B.detach().float())
        for index, layer in pieces
    ]
    if combination_type == "cat":
        return torch.cat([w * a for w, a, _ in scaled]), torch.cat([b for _, _, b in scaled], dim=1)
    if combination_type == "linear":
        if len({a.shape[0] for _, a, _ in scaled}) != 1:
            raise DeltaTuneError('combination_type "linear" needs adapters of equal rank; use "cat" or "svd"')
        lora_A = sum(math.copysign(math.sqrt(abs(w)), w) * a for w, a, _ in scaled)
        lora_B = sum(math.sqrt(abs(w)) * b for w, _, b in scaled)
        return lora_A, lora_B
    a_shape, b_shape = scaled[0][1].shape[1:], scaled[0][2].shape
    delta = sum(w * (b.flatten(1) @ a.flatten(1)) for w, a, b in scaled)
    rank = min(svd_rank or max(a.shape[0] for _, a, _ in scaled), *delta.shape)
    left, singular, right = torch.linalg.svd(delta, full_matrices=False)
    lora_B = (left[:, :rank] * singular[:rank]).view(b_shape[0], rank, *b_shape[2:])
    lora_A = right[:rank].view(rank, *a_shape)
    return lora_A, lora_B
