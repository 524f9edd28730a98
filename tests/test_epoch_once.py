"""Every example is read exactly once per epoch (`train/schedule.py`), also when the example count is not
a multiple of the step (batch_size × gradient_accumulation_steps × world_size): the epoch's last step is
short, its gradient the mean over the examples it has (as every other step's), on every rank layout,
shuffled and length-grouped; a resume over such a step stays bit-exact, and a checkpoint of a run whose
last step wrapped round to the epoch's first examples is refused."""

from __future__ import annotations

import random

import pytest

from deltatune.train import distributed
from deltatune.train.config import TrainConfig
from deltatune.train.schedule import Schedule

LAYOUTS = [(4, 1, 1), (4, 3, 1), (3, 2, 2), (5, 1, 4), (7, 1, 2)]
"""(batch_size, gradient_accumulation_steps, world_size): one process, accumulation, and ranks where a
short step leaves some rank with no examples in its last micro-step."""


def plans(count: int, layout: tuple[int, int, int], grouped: bool, epochs: float = 2.0) -> list[Schedule]:
    """The schedule of every rank of `layout` over `count` examples of varied lengths."""
    batch, accumulation, world_size = layout
    config = TrainConfig(
        model="m",
        train_file="t.jsonl",
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        epochs=epochs,
        group_by_length=grouped,
        seed=5,
    )
    rng = random.Random(count)
    lengths = [rng.randint(3, 60) for _ in range(count)]
    return [
        Schedule(config, lengths, distributed.Ranks(rank=rank, world_size=world_size)) for rank in range(world_size)
    ]


def epoch_reads(ranks: list[Schedule], epoch: int) -> list[int]:
    """Every example index any rank reads in `epoch`, once per read."""
    steps = range(epoch * ranks[0].steps_per_epoch, (epoch + 1) * ranks[0].steps_per_epoch)
    return [index for plan in ranks for step in steps for rows in plan.micro_batches(step) for index in rows]


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "b{}-a{}-w{}".format(*layout))
@pytest.mark.parametrize("count", [10, 23, 103])
def test_every_example_is_read_exactly_once_per_epoch(count: int, layout: tuple[int, int, int], grouped: bool) -> None:
    ranks = plans(count, layout, grouped)
    assert ranks[0].steps_per_epoch == -(-count // ranks[0].per_step)
    assert ranks[0].total == 2 * ranks[0].steps_per_epoch
    for epoch in range(2):
        assert sorted(epoch_reads(ranks, epoch)) == list(range(count))
