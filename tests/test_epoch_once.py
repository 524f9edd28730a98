"""Every example is read exactly once per epoch (`train/schedule.py`), also when the example count is not
a multiple of the step (batch_size × gradient_accumulation_steps × world_size): the epoch's last step is
short, its gradient the mean over the examples it has (as every other step's), on every rank layout,
shuffled and length-grouped; a resume over such a step stays bit-exact, and a checkpoint of a run whose
last step wrapped round to the epoch's first examples is refused."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from deltatune.train import distributed
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.schedule import Schedule
from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
from training_fixtures import task_config

SHORT_STEPS = {**RESUME_SETTINGS, "batch_size": 5}
"""16 examples, 5 a step: epochs of 4 steps, the last reading one example; 8 steps, checkpoints at 3 and 6."""

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


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "b{}-a{}-w{}".format(*layout))
def test_each_step_gradient_averaged_over_the_ranks_is_the_mean_over_its_examples(layout) -> None:
    """The loop's sum over micro-steps of mean loss / divisor, averaged over the ranks (DDP's reduction),
    against the gradient of the plain mean over the step's examples, for every step of an epoch."""
    torch.manual_seed(0)
    count = 23
    inputs, targets, weight = torch.randn(count, 3), torch.randn(count), torch.randn(3)

    def gradient(rows: list[int], scale: float) -> torch.Tensor:
        parameter = weight.clone().requires_grad_(True)
        loss = ((inputs[rows] @ parameter - targets[rows]) ** 2).mean() / scale
        loss.backward()
        return parameter.grad

    ranks = plans(count, layout, grouped=False)
    for step in range(ranks[0].steps_per_epoch):
        per_rank = [sum(gradient(m.rows, m.divisor) for m in plan.micro_steps(step)) for plan in ranks]
        read = [index for plan in ranks for m in plan.micro_steps(step) if m.counted for index in m.rows]
        torch.testing.assert_close(sum(per_rank) / len(ranks), gradient(read, 1.0))


def test_every_rank_runs_every_micro_step_of_a_short_step() -> None:
    """DDP and FSDP reduce in the last micro-step's backward, so every rank runs as many micro-steps;
    a rank with no example left runs a stand-in that counts zero."""
    stand_ins = 0
    for layout in LAYOUTS:
        ranks = plans(23, layout, grouped=True)
        for step in range(ranks[0].steps_per_epoch):
            steps = [plan.micro_steps(step) for plan in ranks]
            assert len({len(micro) for micro in steps}) == 1
            assert all(m.rows for micro in steps for m in micro)
            stand_ins += sum(not m.counted for micro in steps for m in micro)
    assert stand_ins > 0


def test_resume_over_an_epochs_short_last_step_equals_the_uninterrupted_run(tmp_path) -> None:
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **SHORT_STEPS), tmp_path)


def test_a_checkpoint_whose_last_step_read_the_epochs_first_examples_again_is_refused(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **SHORT_STEPS)
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    state_file = tmp_path / "out" / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"]["fingerprint"]["last_step_of_epoch"]  # as a checkpoint written before the short step
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("deltatune: --resume: ") and "last_step_of_epoch" in line, line
