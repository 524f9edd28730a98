"""Timing and peak memory inside one worker process (one library, one workload)."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


def reset_peak_memory() -> None:
    """Start the resident-memory high-water mark afresh (Linux: VmHWM); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """The most resident memory held since the last reset (Linux), or since the process started."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_memory_bytes()


def time_calls(call: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median and spread of `repeats` timed calls after `warmup` untimed ones, and the peak resident
    memory the calls added above what the process held before them."""
    gc.collect()
    reset_peak_memory()
    before = current_memory_bytes()
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_all": seconds,
        "peak_added_bytes": max(peak_memory_bytes() - before, 0),
    }


def time_interleaved(calls: dict[Any, Callable[[], object]], warmup: int, repeats: int) -> dict[Any, dict[str, Any]]:
    """Median of `repeats` timed calls of each callable, the callables alternating (forward order, then
    reversed, ...) so that each meets the same machine load and none is always first; after `warmup`
    untimed rounds."""
    gc.collect()
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[Any, list[float]] = {key: [] for key in calls}
    for repeat in range(repeats):
        order = list(calls) if repeat % 2 == 0 else list(calls)[::-1]
        for key in order:
            start = time.perf_counter()
            calls[key]()
            seconds[key].append(time.perf_counter() - start)
    return {key: {"seconds": statistics.median(values), "seconds_all": values} for key, values in seconds.items()}


def touch_memory(size: int) -> None:
    """Write `size` bytes once and free them, so that later allocations reuse pages the (virtual)
    machine has already backed."""
    if size:
        block = bytearray(size)
        block[:: resource.getpagesize()] = b"\1" * len(range(0, size, resource.getpagesize()))
        del block
