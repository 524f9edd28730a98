"""The training progress bar: steps, loss and tokens per second, timed on training alone.

An evaluation or a checkpoint save between two steps is paused out of the bar (`TrainingBar.paused`):
its time counts in neither the bar's rate and ETA nor `tok_s`. Before, a step followed by an
evaluation as long as 50 steps showed `233 s/step` and an ETA fifty times too long. The bar redraws
at every step (a step is far longer than a redraw), so tqdm's clock stands at the end of the last step
when a pause begins and `tqdm.unpause` removes exactly the pause from it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm


class TrainingClock:
    """Seconds spent training: the time since it started, less the time spent inside `paused()`."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._started = now()
        self._paused = 0.0

    def seconds(self) -> float:
        return self._now() - self._started - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = self._now()
        try:
            yield
        finally:
            self._paused += self._now() - began


class TrainingBar:
    """A tqdm bar over optimizer steps whose rate, ETA and `tok_s` exclude the paused time."""

    def __init__(self, total: int, initial: int, enabled: bool, clock: TrainingClock | None = None) -> None:
        self.clock = clock or TrainingClock()
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0
        )

    def step(self, loss: float, tokens: int) -> None:
        """One optimizer step done; `tokens`: all tokens trained on so far (every process's)."""
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_second(tokens):.0f}", refresh=False)
        self.bar.update(1)

    def tokens_per_second(self, tokens: int) -> float:
        """Training throughput: `tokens` (all trained on so far) over the training time so far."""
        return tokens / max(self.clock.seconds(), 1e-9)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work between steps (evaluation, saving) that is not training time."""
        with self.clock.paused():
            try:
                yield
            finally:
                self.bar.unpause()
                self.bar.refresh()  # an evaluation bar closing redrew this one with the pause counted

    def close(self) -> None:
        self.bar.close()
