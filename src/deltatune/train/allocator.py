"""The trainer's C heap policy: freed tensor memory goes back to the system (`release_freed_memory`).

torch allocates CPU tensors with the C library's `malloc`. glibc serves a request of at least its mmap
threshold with a mapping of its own, unmapped on `free`, and smaller ones from its heaps, whose freed
pages it keeps for reuse. The threshold starts at 128 KiB but rises to the size of every mapped block
freed, up to 32 MiB, so after the first freed activation nearly every tensor of a training step comes
from the heaps; what a step frees there stays resident, in holes a later, differently sized tensor may
not fit. On SmolLM2-135M (LoRA r=16, batch 8 × 64, gradient checkpointing) that retention was ~450 MiB
of the resident peak on either base, more than the live tensors of the step (bench/README.md).

The policy, through `mallopt` (glibc only; a no-op elsewhere, where the C library decides):

    M_MMAP_THRESHOLD = 256 KiB tensors of 256 KiB or more are mapped on their own and unmapped when freed
                               (set explicitly, so the threshold no longer rises)
    M_TRIM_THRESHOLD = 0       free heap pages at the top of a heap are returned at once
    M_ARENA_MAX      = 1       one heap for all threads (torch's worker threads allocate too)

and, after every optimizer step, `return_free_heap_pages` (`malloc_trim`) gives back the free pages inside
the heap that the policy cannot: a step frees thousands of blocks under 256 KiB (adapter gradients, rank-r
intermediates, autograd's nodes) between live ones, and their pages stayed resident, ~230 MiB on
SmolLM2-135M at one 1,000-token row (LoRA r=16 on every linear layer), the peak 130-160 MiB lower with the
trim. The trim is also made once the model is loaded, on any setting: quantizing a checkpoint while it loads
interleaves the packed weights (many under the threshold, so in the heap) with the freed float32 temporaries of
their quantization (17 MiB of SmolLM2's nf4 load).

It changes where memory comes from, never a number a run computes, so it is not part of the run
identity. Its price is a page fault per page of every large tensor made (the kernel zero-fills the new
mapping): on SmolLM2-135M's LoRA step (batch 8 x 64, checkpointing, 2 threads) 2.3-2.8 s became 3.7-4.4 s
per step, so it is opt-in (`release_freed_memory: true`). The trim after the load costs one call, and the
trainer always makes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
"""`mallopt` parameter numbers (glibc's malloc.h)."""
POLICY: dict[int, int] = {M_MMAP_THRESHOLD: 256 << 10, M_TRIM_THRESHOLD: 0, M_ARENA_MAX: 1}
"""The values set: parameter → value (see the module docstring). The threshold: on SmolLM2-135M's LoRA step
(nf4 and float32 bases, batch 8 x 64, checkpointing) 256 KiB gave resident peaks of 337 and 689 MiB,
512 KiB 345 and 701, 1 MiB 350 and 694, at the same step time."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    return library if hasattr(library, "mallopt") and hasattr(library, "gnu_get_libc_version") else None


def release_freed_memory() -> bool:
    """Set `POLICY` for this process; True where it was set (glibc), False where it does not apply."""
    library = _glibc()
    if library is None:
        return False
    return all(library.mallopt(parameter, value) == 1 for parameter, value in POLICY.items())


def return_free_heap_pages() -> bool:
    """Give the free pages inside the C heaps back to the system (glibc's `malloc_trim(0)`); True where
    it applies (glibc)."""
    library = _glibc()
    if library is None:
        return False
    library.malloc_trim(0)
    return True
