"""Length-grouped batches (`group_by_length: true`): examples of similar length share a micro-batch, so
padding to the longest of a batch (or, packed, the ragged ends of its rows) wastes little.

The order of epoch e stays a function of (seed, e) alone, so `--resume` continues it exactly:

    1. the epoch's permutation, drawn from a generator seeded with seed + e (the order an ungrouped run reads);
    2. cut into mega-batches of `MEGABATCH_BATCHES` × batch_size examples, each sorted by length, longest
       first (ties keep their order);
    3. cut into batches of batch_size, put in an order drawn from the same generator; a last, shorter
       batch stays last, so every micro-batch the schedule reads is one of these batches.

Every example is in the order exactly once, so an epoch still sees each once. The length of an example
is its number of input tokens.
"""

from __future__ import annotations

import torch

MEGABATCH_BATCHES = 50
"""Batches per mega-batch, the span within which examples are sorted by length (as transformers'
`LengthGroupedSampler`): a wider span groups lengths more tightly but shuffles less across lengths."""


def grouped_order(
    permutation: torch.Tensor, lengths: list[int], batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """`permutation` reordered so that each run of `batch_size` holds examples of similar `lengths`."""
    span = MEGABATCH_BATCHES * batch_size
    order = permutation.tolist()
    by_length = [
        index
        for start in range(0, len(order), span)
        for index in sorted(order[start : start + span], key=lambda i: -lengths[i])
    ]
    batches = [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]
    whole = len(by_length) // batch_size
    shuffled = [batches[k] for k in torch.randperm(whole, generator=generator).tolist()] + batches[whole:]
    return torch.tensor([index for batch in shuffled for index in batch], dtype=permutation.dtype)
