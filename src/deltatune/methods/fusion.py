"""AdapterFusion (Pfeiffer et al. 2021, arXiv:2005.00247): attention over trained, frozen adapters.

At every site that holds the bottleneck adapters a_1..a_N, with q the hidden state the adapters read
(the last adapter's input z) and u_i the i-th adapter's output before its residual:

    p = softmax_i((W_q q + b_q) · (W_k u_i + b_k))        (dropout on the scores in training)
    h ← h + Σ_i p_i W_v u_i                                W_v: hidden × hidden, no bias

W_q, W_k ~ N(0, 0.02) with zero biases; W_v starts at the identity with 1e-6 everywhere else. This is
AdapterHub's `Fuse` with its default ("dynamic") fusion config, pinned by the cross-check. The fusion
is an adapter of its own (method "fusion", config `FusionConfig(adapters=[...])`): it saves, loads
and deletes like any other, and needs its adapters present (loaded or added) first.
`DeltaModel.fuse("a", "b")` adds it, freezes a and b, and activates `Fuse("a", "b")`.
For parallel adapters q = x; AdapterHub adds x once more there, which we do not copy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..composition import Fuse
from ..config import DeltaConfig
from ..errors import AdapterNameError, DeltaTuneError
from ..field_check import DropoutRate
from ..placement import Placement
from ..registry import register
from ..site_adapter import SiteAdapter
from .bottleneck import BottleneckAdapter


@dataclasses.dataclass
class FusionConfig(DeltaConfig):
    """AdapterFusion settings."""

    adapters: list[str] = dataclasses.field(default_factory=list)
    """The bottleneck adapters fused, in order (two or more)."""
    dropout: DropoutRate = 0.0
    """Dropout on the attention scores in training (AdapterHub uses the model's attention dropout)."""

    def validate(self) -> None:
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise DeltaTuneError(f"a fusion needs two or more distinct adapter names, got {self.adapters!r}")


class FusionLayer(SiteAdapter):
    """The fusion weights at one site; reads the fused adapters from the site that holds it."""

    def __init__(self, held: nn.ModuleDict, config: FusionConfig) -> None:
        super().__init__()
        first: BottleneckAdapter = held[config.adapters[0]]
        reference = next(first.parameters())
        factory = {"dtype": reference.dtype, "device": reference.device}
        hidden = first.hidden
        self.query = nn.Linear(hidden, hidden, **factory)
        self.key = nn.Linear(hidden, hidden, **factory)
        self.value = nn.Linear(hidden, hidden, bias=False, **factory)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.names = tuple(config.adapters)
        self.__dict__["held"] = held  # the site's adapters: not parameters of the fusion
        with torch.no_grad():
            for linear in (self.query, self.key):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def extra_repr(self) -> str:
        return f"adapters={list(self.names)}"

    def fuse(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        missing = [name for name in self.names if name not in self.held]
        if missing:
            raise AdapterNameError(
                f"the fusion over {list(self.names)} lost adapter {missing[0]!r}; load it again or delete the fusion"
            )
        adapters = [self.held[name] for name in self.names]
        dtype = self.value.weight.dtype
        query = self.query(adapters[-1].adapter_input(h, rows).to(dtype))
        ups = torch.stack([adapter.up_output(adapter.adapter_input(h, rows)) for adapter in adapters], dim=-2).to(dtype)
        scores = torch.einsum("...d,...nd->...n", query, self.key(ups))
        probabilities = torch.softmax(self.dropout(scores), dim=-1)
        return h + torch.einsum("...n,...nd->...d", probabilities, self.value(ups)).to(h.dtype)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.fuse(output)

    def forward_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return output.index_copy(0, rows, self.fuse(output.index_select(0, rows), rows))


@register("fusion")
class Fusion:
    """Fusion layers at every site holding all the fused bottleneck adapters."""

    config_class = FusionConfig
    needs_other_adapters = True

    def attach(self, placement: Placement, config: FusionConfig) -> None:
        held_here = [
            (module_name, held)
            for module_name, held in placement.adapters_at()
            if all(isinstance(held[a] if a in held else None, BottleneckAdapter) for a in config.adapters)
        ]
        if not held_here:
            raise AdapterNameError(
                f"no layer holds all of the bottleneck adapters {config.adapters}: add or load them first "
                "(a fusion combines adapters placed at the same sublayers)"
            )
        for module_name, held in held_here:
            placement.put(module_name, FusionLayer(held, config))


def fusion_name(configs: dict[str, DeltaConfig], fuse: Fuse) -> str:
    """The name of the fusion adapter over exactly `fuse.adapters`, in that order."""
    for name, config in configs.items():
        if isinstance(config, FusionConfig) and tuple(config.adapters) == fuse.adapters:
            return name
    raise AdapterNameError(
        f"no fusion over {list(fuse.adapters)}: call delta_model.fuse({', '.join(map(repr, fuse.adapters))}) or load "
        "one first"
    )
