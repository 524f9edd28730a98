"""The shape of a model's prefix table and the pieces prefix tuning builds it from (`prefix_tuning`):
which self-attention modules read the cache and which chunk of the table feeds which layer, the MLP
that can produce the table, and the cache a training call reads the prefix from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..errors import UnsupportedModuleError
from .soft_prompt import CACHE_ARGUMENTS, Stacks, parameter_names

CROSS_ATTENTION_NAMES = ("EncDecAttention", "crossattention", "encoder_attn")
"""Last name parts of cross-attention modules, which get no prefix."""


@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """The shape of one model's prefix table: which attention modules, which chunk feeds which layer."""

    attention: dict[str, int]
    """Full name of each cached self-attention module → its layer index."""
    kv_heads: int
    head_dim: int
    encoder_decoder: bool

    @property
    def layers(self) -> int:
        return len(self.attention)

    @property
    def width(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim

    def chunks(self, layer: int) -> tuple[int, int]:
        """The table chunks (keys, values) of layer `layer`."""
        if self.encoder_decoder:
            return (4 * layer) % (2 * self.layers), (4 * layer + 1) % (2 * self.layers)
        return 2 * layer, 2 * layer + 1


def cached_attention(model: nn.Module, stack: str, cross: bool = False) -> dict[str, int]:
    """The attention modules under `stack` that read a cache (full name → layer index): its self-attention
    modules, or (`cross`) its cross-attention ones; the innermost module where they nest."""
    attention = {}
    for name, module in model.named_modules():
        if (
            not name.startswith(stack + ".")
            or not hasattr(module, "layer_idx")
            or (name.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES) != cross
        ):
            continue
        if any(argument in parameter_names(module) for argument in CACHE_ARGUMENTS):
            attention = {kept: index for kept, index in attention.items() if not name.startswith(kept + ".")}
            attention[name] = module.layer_idx
    return attention


def head_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a model config's attention."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim


def prefix_layout(model: nn.Module, stacks: Stacks) -> PrefixLayout:
    attention = cached_attention(model, stacks.cache_stack)
    if sorted(attention.values()) != list(range(len(attention))) or not attention:
        raise UnsupportedModuleError(
            f"cannot find one cached self-attention module per layer in {type(model).__name__} "
            f"(found {sorted(attention)}); prefix tuning needs attention modules that read the model's cache"
        )
    kv_heads, head_dim = head_shape(model.config)
    return PrefixLayout(attention, kv_heads, head_dim, stacks.decoder is not None)


class PrefixProjection(nn.Module):
    """T = W₂ tanh(W₁ E + b₁) + b₂ over n learned vectors E; `forward()` gives T (n × width)."""

    def __init__(self, count: int, dim: int, hidden: int, width: int, reference: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(count, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        self.to(device=reference.device, dtype=reference.dtype)

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding.weight)

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns start..stop of T: the output layer's rows for them alone, W₂[start:stop] h + b₂[start:stop]."""
        output = self.mlp[2]
        hidden = self.mlp[1](self.mlp[0](self.embedding.weight))
        return nn.functional.linear(hidden, output.weight[start:stop], output.bias[start:stop])


class ReadOnlyPrefixCache(DynamicCache):
    """A cache holding only a prefix: `update` returns [prefix ; new keys] and stores nothing."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def self_attention_part(cache: Any) -> DynamicCache:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def projection_input_width(model: nn.Module, default: int, config: Any) -> int:
    """d of the MLP's learned vectors: `embedding_dim`, `default` (kv_heads · head_dim: peft's MLP has these
    shapes) if unset, the model's hidden size for "hidden_size" (AdapterHub's)."""
    if config.embedding_dim == "hidden_size":
        return model.config.hidden_size
    return config.embedding_dim or default
