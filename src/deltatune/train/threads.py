"""How many CPU threads torch computes with: the `threads` setting, or the cores actually free.

torch starts as many intra-op threads as the machine has cores, whether or not other processes use
them. On a shared machine that oversubscribes: with another process busy on one of two cores, the
two threads of every matrix product wait on each other and steps ran up to 13× slower (measured on
the demo: 2.3 → 30 s/step). The automatic choice counts what is free when the run starts:

    usable = cores this process may run on         (os.sched_getaffinity)
    busy   = round(load · usable / machine cores)   (load: the runnable processes, spread over the
                                                     machine's cores)
    threads = clamp(usable − busy, 1, torch's own default)

The load is the smaller of the 1-minute load average (os.getloadavg) and the most other processes
found runnable in a few samples of /proc/loadavg over 0.1 s: the average alone lags by about a minute,
so right after another job ended it still counted that job; a snapshot alone misses a busy process
that happens to wait at that instant.

and warns in one line when the machine is busy (load above its core count). An explicit `threads`
is used as it is. The count changes no number a run computes beyond the order of float reductions
(a sum split over more threads is added in another order), as another machine would; so it is not
part of the run identity, and `--resume` on another machine, or with another count, is allowed.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger("deltatune")


def free_cores(usable: int, machine_cores: int, load: float) -> int:
    """The cores of `usable` not taken by the `load` (runnable processes over `machine_cores`), at least 1."""
    busy = int(load * usable / max(machine_cores, 1) + 0.5)
    return max(1, usable - busy)


def busy_warning(machine_cores: int, load: float, threads: int) -> str | None:
    """The one-line warning for a machine whose load is above its core count, else None."""
    if load <= machine_cores:
        return None
    return (
        f"this machine is busy (load {load:.1f} on {machine_cores} cores): training with {threads} thread(s); "
        "steps will be slower than on a free machine (set threads=N to choose)"
    )


@functools.cache
def _torch_default() -> int:
    """torch's thread count before the trainer first changed it (its cores, or OMP_NUM_THREADS)."""
    return torch.get_num_threads()


def _usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core is usable
    return len(affinity(0)) if affinity else os.cpu_count() or 1


LOAD_SAMPLES, SAMPLE_SECONDS = 5, 0.02


def _runnable_now() -> float | None:
    """The most processes other than this one runnable at once in `LOAD_SAMPLES` reads of
    /proc/loadavg (its fourth field, running/total); None where the file does not exist (not Linux)."""
    counts = []
    for sample in range(LOAD_SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return None
        counts.append(int(running) - 1)  # this process is running while it reads
        if sample < LOAD_SAMPLES - 1:
            time.sleep(SAMPLE_SECONDS)
    return float(max(0, max(counts)))


def _load() -> float:
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return 0.0
    now = _runnable_now()
    return average if now is None else min(average, now)


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count to `threads`, or to the free cores when None; returns it."""
    ceiling = _torch_default()
    if threads is None:
        machine_cores, load = os.cpu_count() or 1, _load()
        threads = min(ceiling, free_cores(_usable_cores(), machine_cores, load))
        warning = busy_warning(machine_cores, load, threads)
        if warning:
            logger.warning(warning)
    torch.set_num_threads(threads)
    return threads
