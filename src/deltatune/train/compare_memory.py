"""The peak memory of one method's run inside the process that runs a whole comparison.

- CUDA: the most tensor memory allocated during the run (`torch.cuda.max_memory_allocated`, reset at its
  start), less what was allocated when it began; the caching allocator's spare reserve is left out.
- CPU (Linux): the resident-set high-water mark during the run (`VmHWM`, reset to the current resident
  size at its start through `/proc/self/clear_refs`), less the resident size then. The memory of the
  run before is collected and handed back to the system first (`gc`, glibc's `malloc_trim`), so that a
  run is not credited with pages an earlier one left to the allocator.
- Elsewhere (no /proc, another C library): None. A figure not measured is reported as missing, never
  as the process's lifetime peak, which would credit every method with the largest run before it.

Both count the model's load too: the peak of the whole run (load, training, final evaluation). On the
CPU the first method also carries what the process keeps after its first training run (libraries
loaded on first use, thread pools): 24 MiB on a tiny BERT (measured: the same method run first and
again read 24 and 3 MiB), small beside a real model's weights and optimizer state, but read the first
row of a small model with that in mind.
"""

from __future__ import annotations

import contextlib
import gc
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocator import return_free_heap_pages

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
STATM = Path("/proc/self/statm")


@dataclass
class PeakMemory:
    """What `measure_peak` found once its block has ended: bytes above the start, and how they were counted."""

    bytes: int | None = None
    kind: str = "not measured"


@contextlib.contextmanager
def measure_peak(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory the block adds on `device` (see the module docstring)."""
    peak = PeakMemory()
    _collect_freed_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield peak
        peak.bytes, peak.kind = max(torch.cuda.max_memory_allocated(device) - before, 0), "cuda allocated"
        return
    before = _resident_bytes() if _reset_high_water_mark() else None
    yield peak
    high_water = _high_water_bytes()
    if before is not None and high_water is not None:
        peak.bytes, peak.kind = max(high_water - before, 0), "cpu resident"


def _collect_freed_memory() -> None:
    """Collect unreachable objects and hand the C heap's free pages back to the system (glibc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_free_heap_pages()


def _reset_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _resident_bytes() -> int | None:
    try:
        return int(STATM.read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return None


def _high_water_bytes() -> int | None:
    try:
        line = next(line for line in STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024
