"""Which positions a ReFT intervention edits: read once per call at the model's stack.

A `PositionTap` sits at each stack (the module that takes `input_ids` and the 2-D attention mask:
`LlamaModel`, `GPT2Model`, `BertModel`, T5's encoder and decoder stacks) and records, for the call, each
row's first real position (`offsets`, the first 1 of the mask), its number of real tokens (`lengths`)
and how many positions the key/value cache already holds. A row of T real positions then has

    prefix   offset ≤ t < offset + min(p, length)
    suffix   offset + length − min(s, length) ≤ t < offset + length

counted over the whole sequence (cache included); a call edits those among its own positions
(cached ≤ t < cached + L). So left and right padding give each row the positions it has alone, and a
generate() decoding step edits its new token only as one of the last s. Without a mask every row is
all real. AdapterHub reads offsets and lengths the same way (`argmax` and the sum of the mask); for a
row shorter than p it also edits padding positions after the row, which here stay untouched.

What the tap records belongs to the call: it goes when the stack's call ends, even one that raised.
A block run outside the stack's call finds nothing and is refused by name: one called on its own, or
one that gradient checkpointing recomputes in backward (transformers 4.57 reruns the block's hooks there;
transformers 5 does not, and its gradients are those of a plain run). Packed rows (several sequences in a
row, restarted `position_ids`, no mask) are refused too: their positions would be those of the packed row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..site_adapter import ObservingAdapter
from .soft_prompt import CACHE_ARGUMENTS, CallShape, parameter_names


def stacks(model: nn.Module) -> list[str]:
    """Full names of the model's stacks: an encoder-decoder's two, else its inner `base_model`."""
    names = {id(module): name for name, module in model.named_modules()}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return [names[id(model.get_encoder())], names[id(model.get_decoder())]]
    inner = getattr(model, "base_model", None)
    if inner is None or id(inner) not in names:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no transformer stack that takes an attention mask; ReFT needs a "
            "transformers model (LlamaForCausalLM, GPT2LMHeadModel, BertForSequenceClassification, ...)"
        )
    return [names[id(inner)]]


def stack_of_block(block: str, stack_names: Any) -> str:
    """The stack that holds `block` (the longest stack name that prefixes it; "" is the model itself)."""
    holding = [stack for stack in stack_names if stack == "" or block.startswith(stack + ".")]
    if not holding:
        raise DeltaTuneError(f"block {block!r} is in none of the model's stacks {sorted(stack_names)}")
    return max(holding, key=len)


class StackPositions:
    """One stack's row layout for the call in progress, shared by its tap and the interventions on its
    blocks (a plain object, not a module)."""

    def __init__(self, stack: str, module: nn.Module) -> None:
        self.stack = stack
        self.names = parameter_names(module)
        self.cache_key = next((name for name in CACHE_ARGUMENTS if name in self.names), "cache")
        self.layout: tuple[torch.Tensor, torch.Tensor, int] | None = None
        """(offsets, lengths, cached) of the call in progress."""
        self._chosen: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, args: tuple, kwargs: dict) -> None:
        call = CallShape(self.names, args, kwargs, self.cache_key)
        mask = call.keywords.get("attention_mask")
        if mask is None:
            _refuse_packed_rows(call.keywords.get("position_ids"))
            total = call.cached + call.length
            offsets = torch.zeros(call.batch, dtype=torch.long, device=call.device)
            lengths = torch.full((call.batch,), total, dtype=torch.long, device=call.device)
            self.layout = (offsets, lengths, call.cached)
        else:
            if mask.dim() != 2:
                raise DeltaTuneError(
                    f"ReFT needs a 2-D attention_mask (batch × length) at {self.stack or 'the model'}, got "
                    f"{mask.dim()}-D; pass the tokenizer's attention mask"
                )
            real = mask != 0
            self.layout = (real.int().argmax(dim=1), real.sum(dim=1), mask.shape[1] - call.length)
        self._chosen.clear()

    def clear(self) -> None:
        self.layout = None
        self._chosen.clear()

    def chosen(self, prefix: int, suffix: int, hidden: torch.Tensor, rows: torch.Tensor | None) -> list[Picked]:
        """The prefix and suffix positions among `hidden`'s (of `rows` only, in a mixed batch), computed
        once per call and kept for the other blocks."""
        if self.layout is None:
            raise DeltaTuneError(
                "ReFT found no positions for this call: a block ran outside its model's forward call (called on "
                "its own, or recomputed in backward by gradient checkpointing, which ReFT does not support here: "
                "turn it off); call the model, whose attention mask gives the positions"
            )
        key = (prefix, suffix, hidden.shape[1])
        if key not in self._chosen:
            self._chosen[key] = self._compute(prefix, suffix, hidden.shape[1], hidden.device)
        picked = self._chosen[key]
        if rows is None:
            return picked
        return [Picked(item.index.index_select(0, rows), item.valid.index_select(0, rows)) for item in picked]

    def _compute(self, prefix: int, suffix: int, length: int, device: torch.device) -> list[Picked]:
        """[prefix, suffix]: up to p (s) positions per row, as indices into the call's L positions; a
        prefix position that is also a suffix one is left to the suffix (its value wins)."""
        offsets, lengths, cached = self.layout
        offsets, lengths = offsets.to(device)[:, None], lengths.to(device)[:, None]
        suffix_start = offsets + lengths - lengths.clamp(max=suffix)
        prefix_steps, suffix_steps = torch.arange(prefix, device=device), torch.arange(suffix, device=device)
        prefix_positions = offsets + prefix_steps
        prefix_real = (prefix_steps < lengths) & (prefix_positions < suffix_start)
        suffix_positions = suffix_start + suffix_steps
        suffix_real = suffix_steps < lengths.clamp(max=suffix)
        return [
            _in_window(prefix_positions - cached, prefix_real, length),
            _in_window(suffix_positions - cached, suffix_real, length),
        ]


class Picked(NamedTuple):
    """Chosen positions of each row: `index` (B, n) into the call's positions, `valid` (B, n) whether the
    entry is one (rows with fewer chosen positions, or some outside this call, fill with invalid ones)."""

    index: torch.Tensor
    valid: torch.Tensor


def _in_window(local: torch.Tensor, real: torch.Tensor, length: int) -> Picked:
    valid = real & (local >= 0) & (local < length)
    return Picked(local.clamp(0, max(length - 1, 0)), valid)


def _refuse_packed_rows(position_ids: torch.Tensor | None) -> None:
    if position_ids is not None and position_ids.shape[-1] > 1:
        if bool((position_ids[..., 1:] <= position_ids[..., :-1]).any()):
            raise DeltaTuneError(
                "ReFT cannot intervene in packed rows (position_ids restart inside a row): its positions are "
                "counted per row; turn packing off"
            )


class PositionTap(ObservingAdapter):
    """At a stack: record the call's row layout (`StackPositions.record`) for the interventions on its
    blocks, whichever adapters are active; it changes nothing and saves nothing."""

    def __init__(self, positions: StackPositions) -> None:
        super().__init__()
        self.__dict__["positions"] = positions

    def observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.positions.record(args, kwargs)

    def call_ended(self) -> None:
        self.positions.clear()
