"""Dropout on LoRA's input path, h = dropout(x) Aᵀ, at a fraction of the usual time and memory.

peft computes `lora_A(dropout(x))`: a Bernoulli draw per element, a mask and a full dropped copy of x
allocated and kept for the backward pass, in every adapted module. Here, per module and call:
- the mask comes from 64-bit random words read as four 16-bit fields: an element is dropped when its
  field is among the lowest round(p · 2¹⁶) values, so p is used rounded to a multiple of 1/65536
  (0.05 → 0.049988);
- nothing but a seed is kept: the backward pass draws the same mask again. x itself is kept, as the
  undropped LoRA path keeps it, and modules reading the same input (q, k, v) share that one tensor;
- the random words, the mask and the dropped copy live in scratch buffers reused across modules and
  steps (they never outlive one forward or backward call), so no large tensor is allocated;
- the 1/(1-p) rescale is folded into the LoRA scaling by the caller, so x is touched once.
Each module draws its own seed from torch's default generator: masks are independent across modules,
reproducible under `torch.manual_seed`, and replayed by gradient checkpointing (which restores the
generator's state for the recomputation).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

FIELD_LEVELS = 1 << 16
FIELD_MIN = -(1 << 15)
SCRATCH_ENTRIES = 8
_scratch: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()


def drop_threshold(probability: float) -> int:
    """Fields (signed 16-bit) below this value are dropped."""
    return FIELD_MIN + round(probability * FIELD_LEVELS)


def kept_fraction(probability: float) -> float:
    """1 - p as actually used (p rounded to the field resolution)."""
    return 1.0 - round(probability * FIELD_LEVELS) / FIELD_LEVELS


def _buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(random words, keep mask, dropped copy) scratch tensors for inputs shaped like x."""
    key = (x.shape, x.dtype, x.device)
    found = _scratch.get(key)
    if found is None:
        words = torch.empty(((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        found = (words, torch.empty(x.shape, dtype=torch.bool, device=x.device), torch.empty_like(x))
        _scratch[key] = found
        if len(_scratch) > SCRATCH_ENTRIES:
            _scratch.popitem(last=False)
    else:
        _scratch.move_to_end(key)
    return found


def drop_into(x: torch.Tensor, seed: int, threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of kept elements, x with the others zeroed), both in scratch memory; same seed, same mask."""
    words, keep, kept = _buffers(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    torch.ge(words.view(torch.int16)[: x.numel()].view(x.shape), threshold, out=keep)
    torch.mul(x, keep, out=kept)
    return keep, kept


class DroppedProjection(torch.autograd.Function):
    """(x ⊙ m) Aᵀ, m a fresh dropout mask (not rescaled), replayed from its seed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, threshold: int) -> torch.Tensor:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
        _, kept = drop_into(x, seed, threshold)
        ctx.save_for_backward(x, lora_A)
        ctx.seed, ctx.threshold = seed, threshold
        return F.linear(kept, lora_A)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        x, lora_A = ctx.saved_tensors
        keep, kept = drop_into(x, ctx.seed, ctx.threshold)
        grad_x = grad_A = None
        if ctx.needs_input_grad[1]:
            grad_A = grad_hidden.reshape(-1, grad_hidden.shape[-1]).t() @ kept.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ lora_A).mul_(keep)
        return grad_x, grad_A, None
