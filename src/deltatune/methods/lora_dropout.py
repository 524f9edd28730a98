"""Dropout on LoRA's input path, h = dropout(x) Aᵀ, drawing only the positions that drop.

peft computes `lora_A(dropout(x))`: a Bernoulli draw for every element of x, a mask, and a dropped
copy of x kept for the backward pass, in every adapted module. With the usual small p (0.05–0.1)
almost every element survives, so here (CPU):

- the dropped positions are drawn directly: the gaps between them are geometric,
  gap = 1 + ⌊ln(1 − u) / ln(1 − p)⌋ with u uniform in [0, 1), which gives i.i.d. Bernoulli(p) drops with
  one random number per dropped element (n·p of them) instead of one per element. u has 24 random
  bits, which caps a single gap at ln(2⁻²⁴) / ln(1 − p) (324 at p = 0.05, reached with probability
  6·10⁻⁸): the only departure from exact Bernoulli(p);
- x ⊙ m is made in a scratch buffer (a copy of x, then the n·p positions zeroed) whose contents never
  outlive one forward or backward call: no mask is ever made. The buffer is reused across modules and
  steps, and belongs to the adapters that use it (see `scratch_like`), so it is freed with the model;
- backward keeps x (the undropped LoRA path keeps it too), A and the positions (n·p integers, a tenth
  of x's size at p = 0.05) and rebuilds x ⊙ m from them: ∂A = gᵀ (x ⊙ m), ∂x = (g A) ⊙ m;
- the 1/(1-p) rescale is folded into the LoRA scaling by the caller, so x is touched once.
Positions come from torch's default generator: masks are independent across modules, reproducible
under `torch.manual_seed`, and replayed by gradient checkpointing (which restores the generator's
state for the recomputation).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

POSITIONS_LIMIT = 0.6
"""Above this p the kept positions (8 bytes per drop) outweigh `F.dropout`'s saved mask and dropped copy
(5 bytes per float32 element), so `lora.py` then uses `F.dropout` (bench/README.md has the timings)."""

_buffers: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
"""(thread, shape, dtype, device) → the scratch buffer of that kind, while some adapter holds it."""
_held: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""An adapter's `lora_A` → the scratch buffer it used last; the entry goes with the adapter."""


def dropped_positions(count: int, probability: float, device: torch.device) -> torch.Tensor:
    """Sorted flat indices (int64) in [0, count), each included independently with `probability`."""
    log_keep = math.log1p(-probability)
    expected = count * probability
    draws = int(expected + 6 * math.sqrt(expected)) + 16  # enough in one round but for ~1e-9 of calls
    rounds, last = [], -1
    while last < count:
        uniform = torch.rand(draws, device=device)
        gaps = torch.log1p(uniform.neg_()).mul_(1.0 / log_keep).floor_().add_(1)
        positions = torch.cumsum(gaps, 0, dtype=torch.int64).add_(last)
        rounds.append(positions)
        last = int(positions[-1])
    positions = rounds[0] if len(rounds) == 1 else torch.cat(rounds)
    return positions[: int(torch.searchsorted(positions, count))]


def scratch_like(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like x (contents undefined), held by `owner` (the adapter's `lora_A`) until its
    next call, and shared with every other adapter alive that asks for the same kind. Only adapters
    hold buffers (the tables here hold them weakly), so deleting a model frees its scratch memory. One
    per thread: torch ops release the GIL, so threads would otherwise overwrite each other's."""
    key = (threading.get_ident(), x.shape, x.dtype, x.device)
    buffer = _buffers.get(key)
    if buffer is None:
        buffer = torch.empty_like(x, memory_format=torch.contiguous_format)
        _buffers[key] = buffer
    _held[owner] = buffer
    return buffer


def dropped_copy(x: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """x with the flat `positions` set to zero, in `owner`'s scratch memory, valid until the next call."""
    kept = scratch_like(x, owner).copy_(x)
    kept.view(-1).index_fill_(0, positions, 0)
    return kept


class DroppedProjection(torch.autograd.Function):
    """(x ⊙ m) Aᵀ for a fresh dropout mask m (not rescaled), kept in backward as its dropped positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, probability: float) -> torch.Tensor:
        positions = dropped_positions(x.numel(), probability, x.device)
        ctx.save_for_backward(x, lora_A, positions)
        return F.linear(dropped_copy(x, positions, lora_A), lora_A)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        x, lora_A, positions = ctx.saved_tensors
        grad_x = grad_A = None
        if ctx.needs_input_grad[1]:
            kept = dropped_copy(x, positions, lora_A)
            grad_A = grad_hidden.reshape(-1, grad_hidden.shape[-1]).t() @ kept.view(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ lora_A).view(-1).index_fill_(0, positions, 0).view(x.shape)
        return grad_x, grad_A, None
