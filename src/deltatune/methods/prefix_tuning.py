"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190): learned keys and values in front of every self-attention layer's own.

    K_l ← [P^K_l ; K_l],   V_l ← [P^V_l ; V_l]      P^K_l, P^V_l: kv_heads × n × head_dim, l = 0..L-1

All prefixes form one table T ∈ R^{n × 2L·kv_heads·head_dim} (kv_heads, not query heads: grouped-query
attention works). Chunk c of a row is one layer's keys or values: decoder-only and encoder models use
chunks 2l (keys) and 2l+1 (values); encoder-decoders use peft's seq2seq layout, 4l mod 2L and
4l+1 mod 2L, so that files move between the two libraries unchanged. Training can run T through an MLP
(`prefix_projection=True`):

    T = W₂ tanh(W₁ E + b₁) + b₂,    E = Embedding(n, d), W₁: d→h, W₂: h→2L·d,   d = kv_heads·head_dim

and `collapse_soft_prompt` folds it back into the plain table afterwards (peft's files hold only T).
AdapterHub's form (its `PrefixTuningConfig`, used by MAM and UniPELT) is the same MLP with d = the
model's hidden size (`embedding_dim="hidden_size"`), and real tokens keep the positions they have
without a prefix (`shift_positions=False`; peft moves them up by n).

The prefix reaches attention through the model's own cache object (`DynamicCache`; an
`EncoderDecoderCache` whose self-attention part holds it for encoder-decoders), built per call in front
of the first tokens the cache sees, as a prompt is (see `soft_prompt`: mask, positions, mixed batches).
Cached self-attention is what the models expose: decoder-only self-attention, BERT's self-attention and
an encoder-decoder's decoder self-attention (T5's encoder stack drops any cache). An encoder-decoder's
prefix that keeps positions (`shift_positions=False`, AdapterHub's form) is joined at each attention module
instead (`prefix_joined`), and can reach the encoder's self-attention and the cross-attention too
(`encoder_prefix`, `cross_prefix`).

Training runs on a `ReadOnlyPrefixCache`, whose `update` returns [prefix ; new] and stores nothing, so a
layer run twice (gradient checkpointing recomputes it in the backward pass) sees the same keys both
times. transformers drops the cache of a checkpointed layer; an adapter on every self-attention module
hands it back (`PrefixReinsert`; with `use_gating`, `prefix_gating`'s gated form). The table's layout,
its MLP and the training cache are in `prefix_layout`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..field_check import PositiveInt
from ..placement import Placement
from ..registry import register
from ..site import CallNote, RoutingState
from ..site_adapter import SiteAdapter
from .prefix_joined import joined_adapters
from .prefix_layout import (
    PrefixLayout,
    PrefixProjection,
    ReadOnlyPrefixCache,
    prefix_layout,
    projection_input_width,
    self_attention_part,
)
from .soft_prompt import (
    CallShape,
    PromptTable,
    RowLayout,
    SoftPromptConfig,
    SoftPromptMethod,
    Stacks,
    cache_argument,
    find_stacks,
    parameter_names,
)
from .soft_prompt_peft import SoftPromptPeft

_PREFIX_LENGTHS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""For caches that hold only prefixes so far: how many positions. A second active prefix adapter adds
its prefix to such a cache; a cache that has seen tokens gets no prefix again."""
_PREFIX_STARTS: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()
"""For caches with prefixes: where each prefix holder's (by `id`) prefix starts (gated prefixes rewrite it)."""


@dataclasses.dataclass
class PrefixTuningConfig(SoftPromptConfig):
    """Prefix tuning settings; field names follow peft's `PrefixTuningConfig`."""

    prefix_projection: bool = False
    """Train the prefix through an MLP (`Embedding → Linear → tanh → Linear`) instead of as a plain table."""
    encoder_hidden_size: PositiveInt | None = None
    """h, the MLP's hidden size; None: d = kv_heads · head_dim, as in peft (the model's hidden size
    unless it uses grouped-query attention)."""
    embedding_dim: PositiveInt | Literal["hidden_size"] | None = None
    """d, the width of the MLP's learned vectors E; None: kv_heads · head_dim (peft's `token_dim`);
    "hidden_size": the model's hidden size (AdapterHub's)."""
    shift_positions: bool = True
    """Real tokens take positions n, n+1, ... behind the prefix, as in peft; False: they keep the positions
    they have without it, as in AdapterHub (the stack must take `position_ids`; an encoder-decoder's prefix is
    then joined at each attention module, `prefix_joined`)."""
    use_gating: bool = False
    """Scale each layer's prefix by a learned gate of the layer's input (UniPELT; AdapterHub's
    `use_gating`, `methods/prefix_gating.py`); no mixed batches then."""
    shared_gating: bool = True
    """With `use_gating`: one gate for keys and values (else one each)."""
    encoder_prefix: bool = False
    """An encoder-decoder's encoder self-attention gets a prefix of its own too (AdapterHub's `encoder_prefix`;
    needs shift_positions=False); ignored by models without an encoder."""
    cross_prefix: bool = False
    """An encoder-decoder's cross-attention gets a prefix of its own too (AdapterHub's `cross_prefix`; needs
    shift_positions=False); ignored by models without cross-attention."""

    def collapsed(self) -> PrefixTuningConfig:
        return self.replace(prefix_projection=False)


def prefix_length_so_far(cache: Any) -> int | None:
    """How many prefix positions `cache` holds if it has seen no tokens yet (None: it has)."""
    if cache is None:
        return 0
    length = cache.get_seq_length()
    return length if length == _PREFIX_LENGTHS.get(cache, 0) else None


class PrefixCache(SiteAdapter):
    """At the stack whose self-attention reads the cache: put the prefix into it, extend mask and positions."""

    def __init__(
        self,
        source: nn.Module,
        stack: nn.Module,
        stacks: Stacks,
        layout: PrefixLayout,
        num_virtual_tokens: int,
        model_config: Any,
        embedding: nn.Module,
        shift_positions: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.__dict__["embedding"] = (
            embedding  # the model's input embedding, not a part of the adapter: the keys' dtype
        )
        self.num_virtual_tokens = num_virtual_tokens
        self.stacks = stacks
        self.layout = layout
        self.model_config = model_config
        self.names = parameter_names(stack)
        self.cache_key = cache_argument(stack)
        self.accepts_positions = "position_ids" in self.names
        self.shifts_positions = shift_positions
        if not (shift_positions or self.accepts_positions):
            raise UnsupportedModuleError(
                f"{type(stack).__name__} takes no position_ids, so its tokens cannot keep their positions behind a "
                "prefix; set shift_positions=True"
            )
        self.held: dict[int, Any] = {}
        """The cache of the running call per batch size, for `PrefixReinsert` (shared with it); see
        `call_ended` for how long it stays."""

    def prefix(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, each batch × kv_heads × n × head_dim, in the model's dtype."""
        layout = self.layout
        table = (
            self.source()
            .to(self.embedding.weight.dtype)
            .view(self.num_virtual_tokens, 2 * layout.layers, layout.kv_heads, layout.head_dim)
            .permute(1, 2, 0, 3)
        )
        return [
            tuple(table[chunk].expand(batch, -1, -1, -1) for chunk in layout.chunks(layer))
            for layer in range(layout.layers)
        ]

    def new_cache(self, module: nn.Module) -> Any:
        cache = (ReadOnlyPrefixCache if _trains(module) else DynamicCache)(config=self.model_config)
        return (
            EncoderDecoderCache(cache, DynamicCache(config=self.model_config)) if self.layout.encoder_decoder else cache
        )

    def fill(
        self,
        module: nn.Module,
        call: CallShape,
        per_layer: list[tuple[torch.Tensor, torch.Tensor]],
        added: int,
        note: CallNote,
    ) -> None:
        """Put the prefix into the call's cache (a new one if it has none). A cache made for a call that
        asked for none (`use_cache=False`) is taken out of its output again (`note`), as the base model
        hands back no cache then: otherwise `generate(use_cache=False)` fed the prefix and the tokens seen
        so far in again with the whole sequence, and every token was attended twice."""
        cache = call.cache if call.cache is not None else self.new_cache(module)
        if call.cache is None and not self.wants_cache(call):
            note.then(lambda output: without_cache(output, cache))
        part = self_attention_part(cache)
        for layer, (keys, values) in enumerate(per_layer):
            DynamicCache.update(part, keys, values, layer)
        _PREFIX_STARTS.setdefault(cache, {})[id(self)] = _PREFIX_LENGTHS.get(cache, 0)
        _PREFIX_LENGTHS[cache] = _PREFIX_LENGTHS.get(cache, 0) + added
        call.keywords[self.cache_key] = cache
        self.held[call.batch] = cache

    def wants_cache(self, call: CallShape) -> bool:
        """Whether the caller asked for the cache back (`use_cache`, else the model config's default)."""
        asked = call.keywords.get("use_cache")
        return bool(asked) if asked is not None else getattr(self.model_config, "use_cache", True) is not False

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        call = CallShape(self.names, args, kwargs, self.cache_key)
        n = self.num_virtual_tokens
        so_far = prefix_length_so_far(call.cache)
        real_past = call.cached - _PREFIX_LENGTHS.get(call.cache, 0) if call.cache is not None else 0
        if so_far is not None:
            call.check_length(n + so_far, self.stacks.max_positions)
            self.fill(module, call, self.prefix(call.batch), n, note)
        call.extend_mask("attention_mask", None, n, call.length)
        self.place_positions(call, n, None, real_past)
        return (), call.keywords

    def place_positions(self, call: CallShape, width: int, layout: RowLayout | None, real_past: int) -> None:
        """Real positions behind the prefix (`shift_positions`), or as without it."""
        if self.shifts_positions:
            call.shift_positions(width, layout, False, self.accepts_positions, real_past)
        else:
            call.keep_positions(real_past)

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        call = CallShape(self.names, args, kwargs, self.cache_key)
        layout = RowLayout.of(groups, state, call.batch, call.device, rolled=False)
        if len({adapter.shifts_positions for adapter, _ in layout.groups}) > 1:
            raise DeltaTuneError(
                "a mixed batch cannot combine prefixes that shift positions (peft's form) with prefixes that keep "
                "them (AdapterHub's); run them in separate batches"
            )
        first = call.cached == 0
        if first:
            call.check_length(layout.width, self.stacks.max_positions)
            reference = self.embedding.weight  # the prefixes sit right-aligned in the cache, in the model's dtype
            shape = (call.batch, self.layout.kv_heads, layout.width, self.layout.head_dim)
            blocks = [tuple(reference.new_zeros(shape) for _ in range(2)) for _ in range(self.layout.layers)]
            for adapter, rows in layout.groups:
                for layer, pair in enumerate(adapter.prefix(call.batch)):
                    for block, part in zip(blocks[layer], pair):
                        block[rows, :, layout.width - part.shape[2] :] = part[rows]
            self.fill(module, call, blocks, layout.width, note)
            for adapter, _ in layout.groups:
                adapter.held[call.batch] = call.keywords[self.cache_key]
        real_past = call.cached - (0 if first else layout.width)
        call.extend_mask("attention_mask", layout, layout.width, real_past + call.length)
        self.place_positions(call, layout.width, layout, real_past)
        return (), call.keywords

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output

    def call_ended(self) -> None:
        """The cache goes with its call, except in training: gradient checkpointing replays the
        attention layers in the backward pass, after the call, and `PrefixReinsert` hands them the
        same cache again then (the next training call of that batch size replaces it)."""
        if not (self.training and torch.is_grad_enabled()):
            self.held.clear()


def _trains(module: nn.Module) -> bool:
    """A training call (gradient checkpointing may run its layers again in the backward pass)."""
    return module.training and torch.is_grad_enabled()


def without_cache(output: Any, cache: Any) -> Any:
    """A stack's output (a ModelOutput, or a tuple) with `cache` taken out."""
    if isinstance(output, tuple):
        return tuple(item for item in output if item is not cache)
    for key in [key for key, value in output.items() if value is cache]:
        output[key] = None
    return output


class PrefixReinsert(SiteAdapter):
    """On a self-attention module: give back the prefix cache when the layer around it dropped it
    (gradient checkpointing); otherwise nothing."""

    def __init__(self, module: nn.Module, held: dict[int, Any]) -> None:
        super().__init__()
        names = parameter_names(module)
        self.cache_key = cache_argument(module)
        self.position = names.index(self.cache_key)
        self.held = held

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        given = args[self.position] if self.position < len(args) else kwargs.get(self.cache_key)
        hidden = args[0] if args else next(iter(kwargs.values()))
        cache = self.held.get(hidden.shape[0])
        if given is not None or cache is None:
            return args, kwargs
        if self.position < len(args):
            return (*args[: self.position], cache, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.cache_key: cache}

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        return self.prepare(module, args, kwargs, note)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output


class PrefixTuningPeft(SoftPromptPeft):
    """peft's PREFIX_TUNING: it reads the table as L·2 chunks of `token_dim` = kv_heads·head_dim, in
    `num_attention_heads` = kv_heads heads; an encoder-decoder has two transformer submodules (peft's
    seq2seq layout). Its files hold the table T (the projection's output): they load as a plain table."""

    peft_type = "PREFIX_TUNING"
    prompt_holder = PrefixCache

    def config_to_peft(self, config: PrefixTuningConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        if not config.shift_positions or config.use_gating:
            raise DeltaTuneError(
                "peft's prefix tuning moves real positions behind the prefix and has no gate; this adapter keeps "
                "them (shift_positions=False) or is gated (use_gating): save it in deltatune's format"
            )
        layout = prefix_layout(model, find_stacks(model, config))
        return {
            **super().config_to_peft(config, targets, model),
            "token_dim": layout.kv_heads * layout.head_dim,
            "num_attention_heads": layout.kv_heads,
            "num_layers": layout.layers,
            "num_transformer_submodules": 2 if layout.encoder_decoder else 1,
            "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size or layout.kv_heads * layout.head_dim,
        }

    def config_from_peft(self, data: dict[str, Any]) -> PrefixTuningConfig:
        return PrefixTuningConfig.from_dict({"num_virtual_tokens": data["num_virtual_tokens"]})


@register("prefix_tuning")
class PrefixTuning(SoftPromptMethod):
    """Learned key/value prefixes for every cached self-attention layer."""

    config_class = PrefixTuningConfig
    peft_codec = PrefixTuningPeft()

    def adapters(self, placement: Placement, config: PrefixTuningConfig, stacks: Stacks) -> dict[str, SiteAdapter]:
        model = placement.model
        if stacks.decoder is not None and not config.shift_positions:
            return joined_adapters(model, stacks, config)
        if stacks.decoder is not None and (config.encoder_prefix or config.cross_prefix):
            raise DeltaTuneError(
                "prefixes on the encoder and the cross-attention are joined at the attention modules as AdapterHub "
                "joins them, which keeps real positions; set shift_positions=False"
            )
        layout = prefix_layout(model, stacks)
        embedding = model.get_input_embeddings()
        reference = embedding.weight
        count = config.num_virtual_tokens
        if config.prefix_projection:
            dim = projection_input_width(model, layout.kv_heads * layout.head_dim, config)
            source: nn.Module = PrefixProjection(count, dim, config.encoder_hidden_size or dim, layout.width, reference)
        else:
            source = PromptTable(torch.randn(count, layout.width, device=reference.device).to(reference.dtype))
        stack = model.get_submodule(stacks.cache_stack)
        model_config = stack.config if hasattr(stack, "config") else model.config
        owner = PrefixCache(source, stack, stacks, layout, count, model_config, embedding, config.shift_positions)
        built: dict[str, SiteAdapter] = {stacks.cache_stack: owner}
        if config.use_gating:
            from .prefix_gating import gated_reinserts  # it builds on this module's classes

            built.update(gated_reinserts(model, owner, config))
        else:
            built.update({name: PrefixReinsert(model.get_submodule(name), owner.held) for name in layout.attention})
        return built
