"""Prefixes joined at an encoder-decoder's attention modules, as AdapterHub joins them (its prefix tuning on
T5): up to three prefixes, one per kind of attention (`Location`: the encoder's self-attention, the decoder's
self-attention, the decoder's cross-attention), each its own table (or MLP), joined in front of every layer's
keys and values *after* that layer's cache:

    K_l ← [P^K_l ; cache(K_l)],   V_l ← [P^V_l ; cache(V_l)],   mask_l ← [0 … 0 ; mask_l]

The cache never holds a prefix (generation stores the real keys only and every step joins the prefix again),
the prefix is never masked, and the queries keep their positions: on T5 the relative position bias is
computed over the lengthened keys, so a real key j sits at memory position n + j for query i (AdapterHub's
numbers). Layer l of a location reads chunks 2l (keys) and 2l+1 (values) of its table's rows, each
heads · head_dim wide. With `use_gating` a gate of the attention's input scales its layer's prefix
(`gating`: g = mean_t σ(W_g x_t + b_g), one gate or one for keys and one for values).

The first attention module of a location holds the table (`source`); the others read it from there. Each
layer computes only its own columns (an MLP's hidden layer once per layer, its output rows for that layer
alone), so nothing is kept between calls and a layer run twice (gradient checkpointing) reads the same
prefix. Cross-attention keys are then computed from the encoder's states at every step (the model's
cross-attention cache is not used). No mixed batches.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..site import CallNote
from ..site_adapter import SiteAdapter
from .gating import gate_value, make_gate
from .prefix_layout import (
    PrefixProjection,
    cached_attention,
    head_shape,
    projection_input_width,
    self_attention_part,
)
from .soft_prompt import PromptTable, Stacks, cache_argument, parameter_names

MASK_ARGUMENTS = ("mask", "attention_mask")
"""The keyword an attention module takes its mask by (T5: `mask`)."""


class Location(enum.Enum):
    """The kinds of attention a joined prefix reaches; the values are AdapterHub's location keys."""

    ENCODER = "encoder_prefix"
    SELF = "self_prefix"
    CROSS = "cross_prefix"


class JoiningCache:
    """Stands in for an attention module's cache: `update` lets the real cache (if any) store the new keys and
    values, and returns them with the prefix in front; the real cache's length is the length it reports."""

    def __init__(self, inner: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.inner = inner
        self.keys = keys
        self.values = values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0


def lengthened_mask(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A 4-d attention mask (batch × 1 × queries × keys) with `count` open key positions in front: zeros for an
    additive mask, True for a boolean one."""
    if mask is None:
        return None
    opening = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([opening((*mask.shape[:-1], count)), mask], dim=-1)


def causal_mask(length: int, past: int, reference: torch.Tensor) -> torch.Tensor:
    """The additive causal mask (1 × 1 × length × past + length) of `length` queries behind `past` cached keys.
    Built where the model passes none (SDPA's `is_causal`, which would align it to the top left of the
    lengthened keys: queries would see too few real keys)."""
    query = torch.arange(length, device=reference.device)[:, None] + past
    key = torch.arange(past + length, device=reference.device)[None, :]
    mask = torch.zeros(length, past + length, dtype=reference.dtype, device=reference.device)
    return mask.masked_fill(key > query, torch.finfo(reference.dtype).min)[None, None]


def table_columns(source: nn.Module, start: int, stop: int) -> torch.Tensor:
    """Columns start..stop of the table `source` makes (n × width), computing only those."""
    if isinstance(source, PrefixProjection):
        return source.columns(start, stop)
    return source()[:, start:stop]


class JoinedPrefix(SiteAdapter):
    """On one attention module: layer `layer` of its location's prefix, joined after the module's cache."""

    def __init__(
        self,
        module: nn.Module,
        layer: int,
        heads: int,
        head_dim: int,
        count: int,
        location: Location,
        source: nn.Module | None = None,
        holder: JoinedPrefix | None = None,
        gate: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        names = parameter_names(module)
        self.cache_key = cache_argument(module)
        self.mask_key = next((name for name in MASK_ARGUMENTS if name in names), None)
        if self.mask_key is None:
            raise UnsupportedModuleError(f"{type(module).__name__}.forward takes no attention mask {MASK_ARGUMENTS}")
        self.names = names
        self.layer = layer
        self.heads = heads
        self.head_dim = head_dim
        self.num_virtual_tokens = count
        self.location = location
        if source is not None:
            self.source = source
        else:
            self.__dict__["holder"] = holder  # the location's first layer holds the table: not a part of this one
        self.gate = gate

    def table_holder(self) -> JoinedPrefix:
        return self.__dict__.get("holder") or self

    def prefix(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (keys, values), each batch × heads × n × head_dim, gated by `hidden` where gated."""
        width = self.heads * self.head_dim
        columns = table_columns(self.table_holder().source, 2 * self.layer * width, (2 * self.layer + 2) * width)
        pair = columns.view(self.num_virtual_tokens, 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        keys, values = (part.unsqueeze(0).expand(hidden.shape[0], -1, -1, -1) for part in pair)
        if self.gate is not None:
            gates = gate_value(self.gate, hidden).reshape(hidden.shape[0], -1, 1, 1, 1)
            keys, values = keys * gates[:, 0].to(keys.dtype), values * gates[:, -1].to(values.dtype)
        return keys, values

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        bound = dict(zip(self.names, args)) | kwargs
        hidden = bound[self.names[0]]
        given = bound.get(self.cache_key)
        inner = given if isinstance(given, JoiningCache) else None  # another active prefix joined first
        if inner is None and given is not None and self.location is not Location.CROSS:
            inner = self_attention_part(given)
        keys, values = self.prefix(hidden)
        mask = bound.get(self.mask_key)
        if mask is None and self.location is Location.SELF and hidden.shape[1] > 1:
            past = inner.get_seq_length(self.layer) if inner is not None else 0
            mask = causal_mask(hidden.shape[1], past, hidden)
        bound[self.cache_key] = JoiningCache(inner, keys, values)
        bound[self.mask_key] = lengthened_mask(mask, self.num_virtual_tokens)
        return (), bound

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output


def location_modules(model: nn.Module, stacks: Stacks, locations: list[Location]) -> dict[Location, dict[str, int]]:
    """Each location's attention modules (full name → layer index) in an encoder-decoder."""
    found = {
        Location.ENCODER: cached_attention(model, stacks.input, cross=False),
        Location.SELF: cached_attention(model, stacks.cache_stack, cross=False),
        Location.CROSS: cached_attention(model, stacks.cache_stack, cross=True),
    }
    return {location: found[location] for location in locations}


def joined_adapters(model: nn.Module, stacks: Stacks, config: Any) -> dict[str, SiteAdapter]:
    """The adapters of a prefix joined at the attention modules of the locations `config` reaches."""
    locations = [Location.SELF]
    locations += [Location.ENCODER] if config.encoder_prefix else []
    locations += [Location.CROSS] if config.cross_prefix else []
    heads, head_dim = head_shape(model.config)
    reference = model.get_input_embeddings().weight
    count = config.num_virtual_tokens
    gates = 1 if config.shared_gating else 2
    built: dict[str, SiteAdapter] = {}
    for location, modules in location_modules(model, stacks, locations).items():
        width = 2 * len(modules) * heads * head_dim
        if config.prefix_projection:
            dim = projection_input_width(model, heads * head_dim, config)
            source: nn.Module = PrefixProjection(count, dim, config.encoder_hidden_size or dim, width, reference)
        else:
            source = PromptTable(torch.randn(count, width, device=reference.device).to(reference.dtype))
        holder = None
        for name, layer in sorted(modules.items(), key=lambda item: item[1]):
            adapter = JoinedPrefix(
                model.get_submodule(name),
                layer,
                heads,
                head_dim,
                count,
                location,
                source=source if holder is None else None,
                holder=holder,
                gate=make_gate(model.config.hidden_size, gates, reference) if config.use_gating else None,
            )
            holder = holder or adapter
            built[name] = adapter
    return built


def location_holders(model: nn.Module, stacks: Stacks) -> dict[Location, str]:
    """Each location's first attention module, which holds its table (the name its file keys start with)."""
    return {
        location: min(modules, key=modules.get)
        for location, modules in location_modules(model, stacks, list(Location)).items()
        if modules
    }
