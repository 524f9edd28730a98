"""Soft prompts: what prompt tuning, P-tuning and prefix tuning share.

Prompt tuning (Lester et al. 2021, arXiv:2104.08691), P-tuning (Liu et al. 2021, arXiv:2103.10385) and
prefix tuning (Li & Liang 2021, arXiv:2101.00190) learn n "virtual tokens" for a frozen model:

    prompt / P-tuning:  inputs_embeds ← [P ; E(x)]                      P ∈ R^{n×d} (d: hidden size)
    prefix tuning:      K_l ← [P^K_l ; K_l],  V_l ← [P^V_l ; V_l]        P^K_l, P^V_l ∈ R^{kv_heads×n×head_dim}

They enter at the *stack*: the module that turns token ids into hidden states (`LlamaModel`,
`GPT2Model`, `BertModel`, T5's encoder). A `SiteAdapter` there rewrites the stack's inputs in `prepare`:

- the attention mask (2-D) gets n ones in front, `token_type_ids` n zeros;
- positions: virtual tokens take 0..n-1 and every real position moves up by n, so a left-padded row sees
  the positions it sees alone (position_ids given by the caller or by generate() are shifted; without
  them the model counts over the longer sequence, which is the same thing); `cache_position` is dropped
  so that the model recounts it from the cache;
- the cache: the prompt goes in front of the first tokens a cache sees; later calls (generate's decoding
  steps) only get the mask and positions shifted, because the prompt is in the cache already.

Outputs of decoder-only and encoder models are trimmed back to the real tokens, so logits, hidden states
and the loss line up with `input_ids` and `labels` as for the base model. (peft returns logits for the
virtual positions too, and its loss also scores the first label from the last virtual token.) An
encoder-decoder keeps the virtual positions in the encoder output, which the decoder attends to; an
adapter on the decoder extends the cross-attention mask.

Mixed batches (`adapter_names=[...]`): every row gets a block of w = max n columns in front; row r's own
n_r virtual tokens fill the right end of the block, the rest is masked out, and positions are set per
row, so each row computes what it computes alone (a `None` row gets a fully masked block).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from ..config import DeltaConfig
from ..errors import DeltaTuneError, UnsupportedModuleError
from ..field_check import PositiveInt
from ..placement import Placement
from ..site import RoutingState
from ..site_adapter import SiteAdapter

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The keyword a stack takes its key/value cache by: transformers 5 says `cache`, 4.57 `past_key_values`."""

SEQUENCE_FIELDS = {"last_hidden_state": 1, "hidden_states": 1, "attentions": -2}
"""Output fields with a sequence dimension (and which one), trimmed back to the real tokens."""


@dataclasses.dataclass
class SoftPromptConfig(DeltaConfig):
    """What every soft-prompt method shares."""

    num_virtual_tokens: PositiveInt = 8
    """n: how many virtual tokens the prompt (or prefix) has."""

    def collapsed(self) -> SoftPromptConfig:
        """The config of this adapter once its encoder is folded into a plain table (`collapse_soft_prompt`)."""
        return self


@dataclasses.dataclass(frozen=True)
class Stacks:
    """Where a model's soft prompts go, found once at attach time."""

    input: str
    """The stack whose inputs get the prompt (the encoder of an encoder-decoder)."""
    decoder: str | None
    """An encoder-decoder's decoder stack; None otherwise."""
    trim: bool
    """Whether the input stack's outputs are trimmed back to the real tokens (not for an encoder-decoder,
    whose decoder attends to the virtual positions)."""
    max_positions: int | None
    """The model's position limit, if it declares one."""

    @property
    def cache_stack(self) -> str:
        """The stack whose self-attention reads the key/value cache (prefix tuning)."""
        return self.decoder or self.input


def find_stacks(model: nn.Module, config: SoftPromptConfig) -> Stacks:
    """The stacks of a transformers model; a clear error for models without one, or too long a prompt."""
    model_config = getattr(model, "config", None)
    names = {id(module): name for name, module in model.named_modules()}
    if getattr(model_config, "is_encoder_decoder", False):
        stacks = Stacks(names[id(model.get_encoder())], names[id(model.get_decoder())], False, None)
    else:
        inner = getattr(model, "base_model", model)
        if inner is model or id(inner) not in names:
            raise UnsupportedModuleError(
                f"{type(model).__name__} has no inner transformer stack for a soft prompt; attach it to a "
                "transformers model (LlamaForCausalLM, GPT2LMHeadModel, BertForSequenceClassification, ...)"
            )
        stacks = Stacks(names[id(inner)], None, True, getattr(model_config, "max_position_embeddings", None))
    if stacks.max_positions is not None and config.num_virtual_tokens >= stacks.max_positions:
        raise DeltaTuneError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for the input: the model takes at "
            f"most {stacks.max_positions} positions; use fewer virtual tokens"
        )
    return stacks


def parameter_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(module.forward).parameters)


def cache_argument(module: nn.Module) -> str:
    names = parameter_names(module)
    found = next((name for name in CACHE_ARGUMENTS if name in names), None)
    if found is None:
        raise UnsupportedModuleError(f"{type(module).__name__}.forward takes no key/value cache ({CACHE_ARGUMENTS})")
    return found


def embedding_width(model: nn.Module) -> int:
    """Width of the model's token embeddings (peft's `token_dim`)."""
    return model.get_input_embeddings().embedding_dim


class CallShape:
    """A stack call's arguments by keyword, with what the rewrites need to know about them."""

    def __init__(self, names: tuple[str, ...], args: tuple, kwargs: dict, cache_key: str) -> None:
        self.keywords = {**dict(zip(names, args)), **kwargs}
        self.cache_key = cache_key
        self.cache = self.keywords.get(cache_key)
        self.cached = self.cache.get_seq_length() if self.cache is not None else 0
        tokens = self.keywords.get("input_ids")
        self.tokens = tokens if tokens is not None else self.keywords["inputs_embeds"]
        self.batch, self.length = self.tokens.shape[0], self.tokens.shape[1]
        self.device = self.tokens.device

    def check_length(self, added: int, limit: int | None) -> None:
        """Refuse, before the model runs, an input that the added positions push past the model's limit."""
        total = self.cached + self.length + added
        if limit is not None and total > limit:
            raise DeltaTuneError(
                f"the input ({self.length} tokens, {self.cached} cached) with {added} virtual tokens needs "
                f"{total} positions; the model takes at most {limit}. Shorten the input or use fewer virtual tokens"
            )

    def extend_mask(self, key: str, layout: RowLayout | None, width: int, real_length: int) -> None:
        """Give the 2-D mask `key` n ones in front; in a mixed batch, the `layout`'s virtual columns (a
        missing mask becomes explicit there, so that filler columns stay masked)."""
        mask = self.keywords.get(key)
        if mask is None and layout is None:
            return
        if mask is None:
            mask = torch.ones(layout.lengths.shape[0], real_length, dtype=torch.long, device=layout.lengths.device)
        if mask.dim() != 2:
            raise DeltaTuneError(
                f"soft prompts need a 2-D {key} (batch × length), got {mask.dim()}-D; pass the tokenizer's "
                "attention mask and use the default dynamic cache"
            )
        if layout is None:
            self.keywords[key] = torch.cat([mask.new_ones(mask.shape[0], width), mask], dim=1)
        else:
            self.keywords[key] = layout.combine(layout.mask_block().to(mask.dtype), mask)

    def shift_positions(
        self, width: int, layout: RowLayout | None, prepend: bool, accepts_positions: bool, real_past: int = 0
    ) -> None:
        """Move real positions up by n (per row in a mixed batch) and, with `prepend`, give the virtual
        columns theirs. `cache_position` is dropped: the model counts it from the cache again. A mixed
        batch always gets explicit positions, counted from `real_past` (cached real tokens) if not given."""
        self.keywords.pop("cache_position", None)
        positions = self.keywords.get("position_ids")
        if layout is None:
            if positions is None:
                return
            shifted = positions + width
            if prepend:
                virtual = torch.arange(width, device=positions.device).expand(positions.shape[0], width)
                shifted = torch.cat([virtual, shifted], dim=1)
            self.keywords["position_ids"] = shifted
            return
        if not accepts_positions:
            return
        if positions is None:
            positions = torch.arange(real_past, real_past + self.length, device=self.device)[None]
        shifted = positions.expand(self.batch, -1) + layout.lengths[:, None]
        if prepend:
            shifted = layout.combine(layout.columns().clamp(min=0), shifted)
        self.keywords["position_ids"] = shifted

    def keep_positions(self, real_past: int) -> None:
        """Real tokens keep the positions they have without virtual tokens: the caller's `position_ids`, else
        explicit ones counted from `real_past` (cached real tokens), since the model would count the virtual
        ones too. `cache_position` is dropped, as in `shift_positions`."""
        self.keywords.pop("cache_position", None)
        if self.keywords.get("position_ids") is None:
            positions = torch.arange(real_past, real_past + self.length, device=self.device)
            self.keywords["position_ids"] = positions[None].expand(self.batch, -1)


@dataclasses.dataclass
class RowLayout:
    """A mixed batch's virtual columns: row r has `lengths[r]` virtual tokens in a block of `width`.

    `rolled` (calls without a cache: encoders, plain forward calls): row r reads [P_r ; x ; filler], so
    position 0 is the row's first token as when it runs alone (BERT pools there). With a cache (generate)
    the block sits in front, right-aligned: [filler ; P_r ; x], and later tokens follow x directly."""

    width: int
    lengths: torch.Tensor
    groups: list[tuple[Any, torch.Tensor]]
    rolled: bool

    @classmethod
    def of(
        cls,
        groups: list[tuple[SiteAdapter, str, torch.Tensor]],
        state: RoutingState,
        batch: int,
        device: torch.device,
        rolled: bool,
    ) -> RowLayout:
        kinds = {type(adapter) for adapter, _, _ in groups}
        if len(kinds) > 1:
            raise DeltaTuneError(
                "a mixed batch can combine soft-prompt adapters of one method at a time (prompt tuning and "
                "P-tuning together, or prefix tuning alone); run the others in another batch"
            )
        width = max(adapter.num_virtual_tokens for adapter, _, _ in groups)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        expanded = []
        for adapter, name, rows in groups:
            rows = state.expanded_rows(name, rows, batch, device)
            lengths[rows] = adapter.num_virtual_tokens
            expanded.append((adapter, rows))
        return cls(width, lengths, expanded, rolled)

    def offset(self, count: int) -> int:
        """Where in the block a row with `count` virtual tokens has its first one."""
        return 0 if self.rolled else self.width - count

    def columns(self) -> torch.Tensor:
        """(batch, width): each block column's index among its row's virtual tokens (filler: < 0 or ≥ n_r)."""
        shift = (0 if self.rolled else self.width) - self.lengths[:, None] * int(not self.rolled)
        return torch.arange(self.width, device=self.lengths.device)[None] - shift

    def mask_block(self) -> torch.Tensor:
        columns = self.columns()
        return ((columns >= 0) & (columns < self.lengths[:, None])).long()

    def combine(self, block: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The row sequences: `block` (batch × width × ...) and the real part (batch × T × ...)."""
        if not self.rolled:
            return torch.cat([block, real.to(block.dtype)], dim=1)
        index = (
            self.real_index(real.shape[1]).view(real.shape[0], real.shape[1], *([1] * (real.dim() - 2))).expand_as(real)
        )
        return torch.cat([block, torch.zeros_like(real, dtype=block.dtype)], dim=1).scatter(
            1, index, real.to(block.dtype)
        )

    def real_index(self, length: int) -> torch.Tensor:
        """(batch, T): the columns holding the real tokens."""
        return (
            self.lengths[:, None] * int(self.rolled)
            + (0 if self.rolled else self.width)
            + torch.arange(length, device=self.lengths.device)[None]
        )

    def trim(self, tensor: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        """The real tokens' entries of an output along `dim`."""
        dim = dim % tensor.dim()
        shape = [1] * tensor.dim()
        shape[0], shape[dim] = tensor.shape[0], length
        return tensor.gather(
            dim, self.real_index(length).view(shape).expand(*tensor.shape[:dim], length, *tensor.shape[dim + 1 :])
        )


def trim_output(output: Any, count: int, layout: RowLayout | None = None) -> Any:
    """Drop the `count` virtual positions of a stack's output (a ModelOutput, or a tuple led by the
    states); in a mixed batch `layout` says per row where the real tokens are."""

    def real_part(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        length = tensor.shape[dim] - count
        return layout.trim(tensor, dim, length) if layout is not None else tensor.narrow(dim, count, length)

    if isinstance(output, tuple):
        return (real_part(output[0], 1), *output[1:])
    for key, dim in SEQUENCE_FIELDS.items():
        value = output.get(key)
        if value is None:
            continue
        output[key] = (
            tuple(real_part(item, dim) for item in value) if isinstance(value, tuple) else real_part(value, dim)
        )
    return output


class PromptTable(nn.Module):
    """The plain form of a prompt: one learned row per virtual token (`weight`: n × width)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self) -> torch.Tensor:
        return self.weight


class SoftPromptMethod:
    """Attach for the soft-prompt methods: `adapters` says which module gets which adapter."""

    config_class: type[SoftPromptConfig] = SoftPromptConfig

    def adapters(self, placement: Placement, config: SoftPromptConfig, stacks: Stacks) -> dict[str, SiteAdapter]:
        raise NotImplementedError

    def attach(self, placement: Placement, config: SoftPromptConfig) -> None:
        stacks = find_stacks(placement.model, config)
        for target, adapter in self.adapters(placement, config, stacks).items():
            placement.put(target, adapter)


def collapse_soft_prompt(delta_model: Any, name: str = "default") -> None:
    """Fold adapter `name`'s prompt encoder (P-tuning's MLP / LSTM, prefix tuning's MLP) into a plain table
    of its current output. The outputs stay the same; the adapter gets smaller and its config says so."""
    delta_model.require([name])
    config = delta_model.configs[name]
    if not isinstance(config, SoftPromptConfig):
        raise DeltaTuneError(
            f"adapter {name!r} is a {config.method} adapter; only soft prompts have an encoder to collapse"
        )
    trainable = any(parameter.requires_grad for parameter in delta_model.adapter_parameters(name))
    for _, site in delta_model.sites():
        adapter = site.adapters[name] if name in site.adapters else None
        source = getattr(adapter, "source", None)
        if source is not None and not isinstance(source, PromptTable):
            with torch.no_grad():
                adapter.source = PromptTable(source().detach().clone())
    delta_model.replace_config(name, config.collapsed())
    delta_model.set_trainable(name, trainable)
