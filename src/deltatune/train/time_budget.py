"""A run's budget in training time: `deltatune compare --time-budget SECONDS` (`train_run(time_budget=...)`).

A step budget (`max_steps`, `epochs`) fixes the number of optimizer steps, so methods of different speed
get different wall time. A time budget fixes the wall time instead: the run takes steps until
`seconds` of training time have passed (the `TrainingClock`: evaluations and checkpoint saves left out),
however many steps that is, and the learning rate, after the config's warm-up steps, decays over the
share of that time spent (linear: to zero at the end of the budget), so every method gets its whole
schedule. The budget must be finite: an infinite one would never stop, and its learning rate
never decay. The data order is the config's (seed, step) order, cycling over epochs. The learning rate
then depends on the machine's speed, so such a run is not resumable bit-exactly: `--resume` is refused,
both with a time budget and, for a checkpoint a time-budgeted run wrote, without one (its run identity
records the budget). A method whose step hook runs a schedule over the total step count (AdaLoRA's rank
budget: its class sets `schedule_counts_steps`) is refused a time budget, since the count is not known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DeltaTuneError
from ..registry import get_method
from .progress import TrainingClock


def refuse_step_schedules(method: str) -> None:
    """Refuse a time budget for `method` if its step hook schedules over the run's total step count."""
    if getattr(get_method(method), "schedule_counts_steps", False):
        raise DeltaTuneError(
            f"method {method!r} schedules its training over the run's step count, which a time budget leaves "
            "unknown; give the budget as --max-steps or --epochs"
        )


@dataclass
class StopRule:
    """When the loop stops: after `steps` optimizer steps, or with `seconds` once that much training time
    (on `clock`) has passed."""

    steps: int
    seconds: float | None
    clock: TrainingClock

    def __post_init__(self) -> None:
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds > 0):
            raise DeltaTuneError(
                f"the time budget must be finite and positive, got {self.seconds:g} seconds; give the seconds of "
                "training time the run takes"
            )

    def finished(self, step: int) -> bool:
        """Whether the run stops after `step` steps."""
        return self.clock.seconds() >= self.seconds if self.seconds is not None else step >= self.steps

    def share_spent(self, step: int) -> float:
        """The share of the time budget spent (0 → 1), for the learning-rate decay."""
        return min(1.0, self.clock.seconds() / self.seconds)

    @property
    def known_steps(self) -> int | None:
        """The number of steps the run takes, where it is known in advance (for the progress bar)."""
        return None if self.seconds is not None else self.steps
