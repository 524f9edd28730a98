"""The training bar's rate, ETA and tokens per second count training time only: time paused for an
evaluation or a checkpoint save is left out (on a fake clock, so nothing here depends on timing)."""

from __future__ import annotations

import io

import pytest

from deltatune.train.progress import TrainingBar, TrainingClock

pytestmark = pytest.mark.transformers_independent  # the bar on a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_training_clock_leaves_out_paused_time() -> None:
    clock = FakeClock()
    training = TrainingClock(clock)
    clock.now += 10
    with training.paused():
        clock.now += 500
    clock.now += 5
    assert training.seconds() == 15


def test_a_long_evaluation_changes_neither_the_bars_rate_nor_its_tokens_per_second(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock)  # the clock tqdm reads
    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = TrainingBar(total=100, initial=0, enabled=True, clock=TrainingClock(clock))
    for step in range(1, 11):
        clock.now += 2.0  # a step of 2 s, 50 tokens
        bar.step(loss=1.0, tokens=50 * step)
        if step == 5:
            with bar.paused():
                clock.now += 250.0  # an evaluation as long as 125 steps
    shown = bar.bar.format_dict
    assert shown["elapsed"] == pytest.approx(20.0)
    assert shown["rate"] == pytest.approx(0.5)  # steps per second: 2 s/step, not 27 s/step
    assert bar.bar.postfix == "loss=1.0000, tok_s=25"
    bar.close()
