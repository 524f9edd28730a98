"""Learned gates on a module's delta (UniPELT, Mao et al. 2022, arXiv:2110.07577), as AdapterHub's
`use_gating` computes them:

    g = mean_t σ(W_g x_t + b_g)      W_g: heads × width; one value per example (and head)

x is what the gated part reads (the bottleneck's input, the LoRA layer's input, the attention layer's
input for a prefix); the part's contribution is multiplied by g. The mean runs over every position of
the sequence, padding included, as in AdapterHub. W_g starts N(0, 0.02²), b_g at 0 (g = ½ for every
input at first).
"""

from __future__ import annotations

import torch
from torch import nn


def make_gate(width: int, heads: int, reference: torch.Tensor) -> nn.Linear:
    """W_g, b_g: a `width → heads` linear, initialised as AdapterHub's gates are."""
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    gate = nn.Linear(width, heads, device=reference.device, dtype=dtype)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02)
        nn.init.zeros_(gate.bias)
    return gate


def gate_value(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """g for `x` (batch × sequence × width, or batch × width): batch × 1 × heads (batch × heads), in x's dtype."""
    values = torch.sigmoid(gate(x.to(gate.weight.dtype)))
    return (values.mean(dim=1, keepdim=True) if values.dim() == 3 else values).to(x.dtype)
