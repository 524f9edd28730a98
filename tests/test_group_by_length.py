"""`group_by_length: true` (deltatune.train.length_groups): on a data set of skewed lengths the padding
of the micro-batches falls, every example is still read once per epoch, the order is a function of
(seed, epoch), resume is bit-exact, and a resume with the setting switched is refused."""

from __future__ import annotations

import random

import pytest

from deltatune.train import distributed
from deltatune.train.config import TrainConfig
from deltatune.train.schedule import Schedule
from resume_checks import RESUME_SETTINGS as SHARED_RESUME_SETTINGS
from resume_checks import assert_resume_equals_the_uninterrupted_run, assert_resume_with_a_switched_setting_is_refused
from training_fixtures import WORDS, task_config, write_jsonl

RESUME_SETTINGS = {**SHARED_RESUME_SETTINGS, "group_by_length": True}


def skewed_lengths(count: int, seed: int = 0) -> list[int]:
    """Mostly short examples, a few long ones (a log-normal spread, as chat data has)."""
    rng = random.Random(seed)
    return [min(512, 8 + int(rng.lognormvariate(3.0, 1.0))) for _ in range(count)]


def schedule(lengths: list[int], grouped: bool, rank: int = 0, world_size: int = 1) -> Schedule:
    config = TrainConfig(model="m", train_file="t.jsonl", batch_size=8, epochs=2.0, group_by_length=grouped, seed=3)
    return Schedule(config, lengths, distributed.Ranks(rank=rank, world_size=world_size))


def epoch_batches(plan: Schedule, epoch: int) -> list[list[int]]:
    first = epoch * plan.steps_per_epoch
    return [rows for step in range(first, first + plan.steps_per_epoch) for rows in plan.micro_batches(step)]


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    """Padded positions when every batch is padded to its longest example."""
    return sum(len(rows) * max(lengths[i] for i in rows) - sum(lengths[i] for i in rows) for rows in batches)


def test_grouping_cuts_the_padding_of_skewed_lengths_at_least_in_half() -> None:
    lengths = skewed_lengths(800)
    for epoch in range(2):
        shuffled = padding(lengths, epoch_batches(schedule(lengths, grouped=False), epoch))
        grouped = padding(lengths, epoch_batches(schedule(lengths, grouped=True), epoch))
        assert grouped < 0.5 * shuffled, (grouped, shuffled)


@pytest.mark.parametrize("count", [800, 803], ids=["whole-batches", "a-short-last-batch"])
def test_every_example_is_read_once_per_epoch(count: int) -> None:
    lengths = skewed_lengths(count)
    plan = schedule(lengths, grouped=True)
    for epoch in range(2):
        read = [index for rows in epoch_batches(plan, epoch) for index in rows]
        assert sorted(read) == list(range(count))  # a short last step, no example read twice


def test_the_grouped_order_is_a_function_of_seed_and_epoch_and_changes_with_the_epoch() -> None:
    lengths = skewed_lengths(400)
    once, again = schedule(lengths, grouped=True), schedule(lengths, grouped=True)
    late_first = [again.micro_batches(step) for step in reversed(range(2 * again.steps_per_epoch))][::-1]
    assert [once.micro_batches(step) for step in range(2 * once.steps_per_epoch)] == late_first
    assert epoch_batches(once, 0) != epoch_batches(once, 1)


@pytest.mark.parametrize("count", [800, 803], ids=["whole-batches", "a-short-last-batch"])
def test_each_rank_reads_whole_length_groups_under_data_parallel(count: int) -> None:
    lengths = skewed_lengths(count)
    grouped_batches = {tuple(rows) for rows in epoch_batches(schedule(lengths, grouped=True), 0)}
    for rank in range(2):
        plan = schedule(lengths, grouped=True, rank=rank, world_size=2)
        assert all(tuple(rows) in grouped_batches for rows in epoch_batches(plan, 0) if rows)  # none: a stand-in


def varied_records(count: int = 24, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of 1 to 8 words, completions of 1 to 5: examples of 4 to 15 tokens."""
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
            "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
        }
        for _ in range(count)
    ]


def test_resume_of_a_length_grouped_run_equals_the_uninterrupted_run(tmp_path) -> None:
    data = write_jsonl(tmp_path / "varied.jsonl", varied_records())
    config = task_config(tmp_path, "causal-lm", train_file=data, **RESUME_SETTINGS)
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


def test_resume_with_group_by_length_switched_is_refused_naming_it(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "group_by_length=false", "group_by_length: true → false"
    )
