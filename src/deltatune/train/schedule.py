"""When a run does what: which examples each rank reads at each micro-step (`Schedule`), and the
learning rate at each step (`learning_rate_factor`). Both are pure functions of (seed, step), so any
step can be reproduced from a checkpoint's step alone: that is what keeps `--resume` bit-exact."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import distributed
from .config import TrainConfig
from .length_groups import grouped_order

DECAY: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}
"""Learning-rate factor after warm-up, as a function of the share of those steps done (0 → 1)."""


def learning_rate_factor(
    config: TrainConfig, total_steps: int, decay_progress: Callable[[int], float] | None = None
) -> Callable[[int], float]:
    """The schedule as a function of the step: linear warm-up, then `DECAY[config.scheduler]` of the share
    of the steps after warm-up done, or of `decay_progress(step)` where given (a time budget's share spent)."""
    decay = DECAY[config.scheduler]
    warmup = warmup_steps(config, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay_progress is not None:
            return decay(decay_progress(step))
        return decay((step - warmup) / max(1, total_steps - warmup))

    return factor


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """The run's warm-up steps: `warmup_steps` where set, else ⌊warmup_ratio × total_steps⌋ (with a time
    budget, `total_steps` is the steps of the config's own epochs or max_steps)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return math.floor((config.warmup_ratio or 0.0) * total_steps)


@dataclass(frozen=True)
class MicroBatch:
    """One forward and backward of a step on this rank."""

    rows: list[int]
    """The examples it reads; where this rank has none left in an epoch's short last step, the step's first
    as a stand-in that counts zero (every rank runs every micro-step: the last one's backward is a collective)."""
    divisor: float
    """What its mean loss is divided by: (the step's examples) / (world_size × its examples), so that the
    gradient, summed over the micro-steps and averaged over the ranks, is the mean over the step's examples
    (gradient_accumulation_steps in a whole step); infinite for a stand-in."""

    @property
    def counted(self) -> bool:
        """Whether its examples count (it is no stand-in)."""
        return math.isfinite(self.divisor)


class Schedule:
    """Which examples each rank reads at each micro-step: a pure function of (seed, step); with
    `group_by_length`, of the examples' `lengths` too (`length_groups.py`).

    Epoch e is steps [e·S, (e+1)·S), S = ⌈count / per_step⌉, reading the epoch's order once: each step the
    next per_step examples, cut into runs of batch_size, run j going to micro-step ⌊j / world_size⌋ of rank
    j mod world_size. The last step is short when per_step does not divide the count: it has the runs left,
    so fewer micro-steps (and on some ranks an empty last one) and a last run shorter than batch_size."""

    def __init__(self, config: TrainConfig, lengths: list[int], ranks: distributed.Ranks) -> None:
        self.batch, self.accumulation, self.ranks, self.count, self.seed = (
            config.batch_size,
            config.gradient_accumulation_steps,
            ranks,
            len(lengths),
            config.seed,
        )
        self.lengths = lengths if config.group_by_length else None
        self.per_step = self.batch * self.accumulation * ranks.world_size
        self.steps_per_epoch = max(1, math.ceil(self.count / self.per_step))
        self.total = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self._order: tuple[int, torch.Tensor] | None = None

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's examples at each micro-step of `step` (an empty list where it has none left)."""
        return self._layout(self._step_examples(step))

    def micro_steps(self, step: int) -> list[MicroBatch]:
        """`micro_batches(step)` with the divisor of each one's loss; the step's first example stands in
        where this rank has none."""
        examples = self._step_examples(step)
        return [
            MicroBatch(rows, len(examples) / (self.ranks.world_size * len(rows)))
            if rows
            else MicroBatch(examples[:1], math.inf)
            for rows in self._layout(examples)
        ]

    def _step_examples(self, step: int) -> list[int]:
        """The examples `step` reads over all ranks: the next per_step of its epoch's order, or those left."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.count, generator=generator)
            if self.lengths is not None:
                order = grouped_order(order, self.lengths, self.batch, generator)
            self._order = (epoch, order)
        return self._order[1][within * self.per_step :][: self.per_step].tolist()

    def _layout(self, examples: list[int]) -> list[list[int]]:
        """This rank's share of a step's `examples`: run j of batch_size at micro-step ⌊j / world_size⌋ of
        rank j mod world_size."""
        world_size, size = self.ranks.world_size, self.batch
        micro_steps = math.ceil(math.ceil(len(examples) / size) / world_size)
        return [examples[(k * world_size + self.ranks.rank) * size :][:size] for k in range(micro_steps)]
