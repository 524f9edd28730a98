"""Compacter (Mahabadi et al. 2021, arXiv:2106.04647): a bottleneck adapter whose two linears are
parameterised hypercomplex multiplication (PHM) layers, or plain low-rank layers.

    PHM:       y = x H + b,   H = Σ_{i<n} C_i ⊗ (W_left_i W_right_i)        H: in × out
               C_i: n × n rule matrices, shared by every PHM layer of the adapter (all layers, down
               and up); W_left_i: (in/n) × rank, W_right_i: rank × (out/n); n = 4, rank = 1
    low-rank:  y = x W_left W_right + b                                     W_left: in × rank

Everything else (placement, residual, scaling, AdapterDrop, Fusion) is the bottleneck adapter's
(`bottleneck.py`); this file only supplies other projections. The shared rule is one parameter
registered in every PHM layer (tied, like tied embeddings); files store it once, at the first layer.
Defaults follow AdapterHub's `compacter` (Houlsby placement, reduction 32, gelu); its PHM weights
start Glorot-normal, the rule N(0, phm_init_range).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..field_check import NonNegativeFloat, PositiveInt
from ..registry import register
from .bottleneck import Bottleneck, BottleneckConfig


@dataclasses.dataclass
class CompacterConfig(BottleneckConfig):
    """Compacter settings: a `BottleneckConfig` (presets too) plus the PHM layer's."""

    linear: str = "phm"
    """"phm" (Kronecker sums with shared rules) or "low_rank" (two factors of rank `phm_rank`)."""
    phm_dim: PositiveInt = 4
    """n, the number of rule matrices and their size; hidden and bottleneck sizes must divide by it."""
    phm_rank: PositiveInt = 1
    """Rank of each W_i = W_left_i W_right_i (and of the low-rank layer)."""
    phm_init_range: NonNegativeFloat = 1e-4
    """Standard deviation of the rule matrices at init."""

    def preset_values(self) -> dict[str, Any]:
        return {**super().preset_values(), "reduction_factor": 32, "non_linearity": "gelu"}

    def validate(self) -> None:
        super().validate()
        if self.linear not in PROJECTIONS:
            raise DeltaTuneError(f"linear must be one of {sorted(PROJECTIONS)}, got {self.linear!r}")


class SharedRule:
    """The rule matrices C (n × n × n) of one adapter; the first PHM layer built owns them in files."""

    def __init__(self, config: CompacterConfig, reference: torch.Tensor) -> None:
        n = config.phm_dim
        self.parameter = nn.Parameter(torch.empty(n, n, n, dtype=reference.dtype, device=reference.device))
        nn.init.normal_(self.parameter, std=config.phm_init_range)
        self.claimed = False

    def claim(self) -> bool:
        """True the first time (that layer saves the rule), False after."""
        first, self.claimed = not self.claimed, True
        return first


class PHMLinear(nn.Module):
    """y = x H + b with H = Σ_i C_i ⊗ (W_left_i W_right_i)."""

    def __init__(
        self, in_features: int, out_features: int, config: CompacterConfig, rule: SharedRule, reference: torch.Tensor
    ) -> None:
        super().__init__()
        n, rank = config.phm_dim, config.phm_rank
        if in_features % n or out_features % n:
            raise DeltaTuneError(
                f"PHM layers need sizes divisible by phm_dim={n}, got {in_features} → {out_features}; change phm_dim "
                "or reduction_factor"
            )
        factory = {"dtype": reference.dtype, "device": reference.device}
        self.in_features, self.out_features = in_features, out_features
        self.phm_rule = rule.parameter
        self.shared_keys = () if rule.claim() else ("phm_rule",)
        self.W_left = nn.Parameter(torch.empty(n, in_features // n, rank, **factory))
        self.W_right = nn.Parameter(torch.empty(n, rank, out_features // n, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        for factor in (*self.W_left, *self.W_right):
            nn.init.xavier_normal_(factor)

    def weight(self) -> torch.Tensor:
        """H (in × out): block (a, b) of C_i ⊗ W_i is C_i[a, b] · W_i."""
        blocks = torch.bmm(self.W_left, self.W_right)
        return torch.einsum("iab,icd->acbd", self.phm_rule, blocks).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight()).view(
            *x.shape[:-1], self.out_features
        )

    def zero_output(self) -> None:
        nn.init.zeros_(self.W_right)


class LowRankLinear(nn.Module):
    """y = x W_left W_right + b."""

    def __init__(
        self, in_features: int, out_features: int, config: CompacterConfig, rule: None, reference: torch.Tensor
    ) -> None:
        super().__init__()
        factory = {"dtype": reference.dtype, "device": reference.device}
        self.W_left = nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, config.phm_rank, **factory)))
        self.W_right = nn.Parameter(nn.init.xavier_normal_(torch.empty(config.phm_rank, out_features, **factory)))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.W_left) @ self.W_right + self.bias

    def zero_output(self) -> None:
        nn.init.zeros_(self.W_right)


PROJECTIONS: dict[str, type[nn.Module]] = {"phm": PHMLinear, "low_rank": LowRankLinear}


@register("compacter")
class Compacter(Bottleneck):
    """The bottleneck method with PHM (or low-rank) projections."""

    config_class = CompacterConfig

    def shared_parameters(
        self, hidden: int, size: int, config: CompacterConfig, reference: torch.Tensor
    ) -> SharedRule | None:
        return SharedRule(config, reference) if config.linear == "phm" else None

    def make_projections(
        self, hidden: int, size: int, config: CompacterConfig, shared: SharedRule | None, reference: torch.Tensor
    ) -> tuple[nn.Module, nn.Module]:
        projection = PROJECTIONS[config.linear]
        down, up = (
            projection(hidden, size, config, shared, reference),
            projection(size, hidden, config, shared, reference),
        )
        if config.init_weights == "zero_up":
            with torch.no_grad():
                up.zero_output()
        return down, up
