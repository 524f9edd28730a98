"""Gated prefixes (UniPELT, Mao et al. 2022, arXiv:2110.07577; AdapterHub's prefix `use_gating`): at every
self-attention layer l a gate of the layer's input x scales that layer's prefix keys and values:

    K_l ← [g_K · P^K_l ; K_l],  V_l ← [g_V · P^V_l ; V_l],   (g_K, g_V) = mean_t σ(W_g x_t + b_g)  (`gating`)

one gate for both (`shared_gating`, W_g: 1 × hidden) or one each (2 × hidden). The prefix sits in the
call's cache (`prefix_tuning`); the adapter on the attention module writes g · P (from the prefix itself,
never from what the cache holds, so a gate never compounds) over the cache's first n positions of its
layer before the layer runs (positions start..start+n where other prefixes come first). A gated prefix
runs in batches of its own (no mixed batches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..site import CallNote, RoutingState
from .gating import gate_value, make_gate
from .prefix_tuning import _PREFIX_STARTS, PrefixCache, PrefixReinsert, self_attention_part


class GatedPrefixReinsert(PrefixReinsert):
    """`PrefixReinsert` that also gates layer `layer`'s prefix by the layer's input."""

    def __init__(self, module: nn.Module, owner: PrefixCache, layer: int, hidden: int, heads: int) -> None:
        super().__init__(module, owner.held)
        self.layer = layer
        self.gate = make_gate(hidden, heads, owner.embedding.weight)
        self.__dict__["owner"] = owner  # the prefix's holder at the stack: not a part of this module

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        args, kwargs = super().prepare(module, args, kwargs, note)
        cache = args[self.position] if self.position < len(args) else kwargs.get(self.cache_key)
        hidden = args[0] if args else next(iter(kwargs.values()))
        if cache is None:
            return args, kwargs
        start = _PREFIX_STARTS.get(cache, {}).get(id(self.owner))
        if start is None:
            return args, kwargs
        end = start + self.owner.num_virtual_tokens
        gates = gate_value(self.gate, hidden).reshape(hidden.shape[0], -1, 1, 1, 1)  # batch × heads × 1 × 1 × 1
        keys, values = self.owner.prefix(hidden.shape[0])[self.layer]
        stored = self_attention_part(cache).layers[self.layer]
        stored.keys = gated_span(stored.keys, keys, gates[:, 0], start, end)
        stored.values = gated_span(stored.values, values, gates[:, -1], start, end)
        return args, kwargs

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        raise DeltaTuneError("a gated prefix (use_gating) runs in batches of its own; run it without adapter_names")


def gated_span(stored: torch.Tensor, prefix: torch.Tensor, gate: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`stored` (batch × heads × length × dim) with positions start..end replaced by gate · prefix."""
    gated = prefix * gate.to(prefix.dtype)
    return torch.cat([stored[:, :, :start], gated.to(stored.dtype), stored[:, :, end:]], dim=2)


def gated_reinserts(model: nn.Module, owner: PrefixCache, config: Any) -> dict[str, GatedPrefixReinsert]:
    """One gated adapter per self-attention module of the owner's layout."""
    heads = 1 if config.shared_gating else 2
    hidden = model.config.hidden_size
    return {
        name: GatedPrefixReinsert(model.get_submodule(name), owner, layer, hidden, heads)
        for name, layer in owner.layout.attention.items()
    }
