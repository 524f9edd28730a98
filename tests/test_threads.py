"""The `threads` setting: the automatic count is the usable cores less those the load keeps busy (at
least 1, at most torch's own default), with one warning line on a busy machine; an explicit count is
used as given, reaches torch through `deltatune train`, and is not part of the run identity."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from deltatune.train import threads
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.fingerprint import run_record
from training_fixtures import task_config


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("usable", "machine_cores", "load", "expected"),
    [
        (2, 2, 0.0, 2),  # a free machine: every core
        (2, 2, 0.4, 2),  # less than half a core busy
        (2, 2, 1.0, 1),  # another process on one of two cores: the case
        (2, 2, 0.6, 1),
        (2, 2, 7.5, 1),  # overloaded: never fewer than one
        (16, 16, 3.2, 13),
        (4, 16, 8.0, 2),  # allowed 4 of 16 cores, half the machine busy: 2 of ours
        (1, 8, 0.0, 1),
    ],
)
def test_the_free_cores_are_the_usable_ones_less_the_busy_share(usable, machine_cores, load, expected) -> None:
    assert threads.free_cores(usable, machine_cores, load) == expected


def test_a_busy_machine_gets_one_warning_line_and_a_free_one_none() -> None:
    assert threads.busy_warning(2, 2.0, 1) is None
    warning = threads.busy_warning(2, 3.4, 1)
    assert "\n" not in warning and "load 3.4 on 2 cores" in warning and "threads=N" in warning


def fake_machine(monkeypatch, usable: int, machine_cores: int, load: float, torch_default: int = 64) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: machine_cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "_runnable_now", lambda: None)  # the load average alone
    monkeypatch.setattr(threads, "_torch_default", lambda: torch_default)


def test_automatic_threads_use_the_free_cores_and_warn_when_busy(monkeypatch, caplog) -> None:
    fake_machine(monkeypatch, usable=4, machine_cores=4, load=1.2)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert threads.use_threads(None) == 3 and torch.get_num_threads() == 3
    assert not caplog.records
    fake_machine(monkeypatch, usable=4, machine_cores=4, load=6.0)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert threads.use_threads(None) == 1 and torch.get_num_threads() == 1
    assert [record.getMessage() for record in caplog.records] == [threads.busy_warning(4, 6.0, 1)]


def test_a_job_that_just_ended_does_not_count_while_the_load_average_still_holds_it(monkeypatch) -> None:
    fake_machine(monkeypatch, usable=2, machine_cores=2, load=2.2)
    monkeypatch.setattr(threads, "_runnable_now", lambda: 0.0)  # nothing else runnable now
    assert threads.use_threads(None) == 2
    monkeypatch.setattr(threads, "_runnable_now", lambda: 1.0)  # another process running too
    assert threads.use_threads(None) == 1


def test_a_passing_burst_the_load_average_has_not_seen_does_not_count(monkeypatch) -> None:
    fake_machine(monkeypatch, usable=2, machine_cores=2, load=0.4)
    monkeypatch.setattr(threads, "_runnable_now", lambda: 3.0)
    assert threads.use_threads(None) == 2


def test_automatic_threads_never_exceed_torchs_own_default(monkeypatch) -> None:
    fake_machine(monkeypatch, usable=8, machine_cores=8, load=0.0, torch_default=2)
    assert threads.use_threads(None) == 2


def test_an_explicit_thread_count_wins_over_a_busy_machine(monkeypatch, caplog) -> None:
    fake_machine(monkeypatch, usable=2, machine_cores=2, load=9.0)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert threads.use_threads(2) == 2 and torch.get_num_threads() == 2
    assert not caplog.records


def test_train_and_eval_compute_with_the_configs_threads(tmp_path, capsys) -> None:
    config = str(task_config(tmp_path, "seq-cls", max_steps=1))
    assert main(["train", config, "threads=2", "--quiet"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["eval", config, "threads=1"]) == 0
    assert torch.get_num_threads() == 1


def test_the_thread_count_is_not_part_of_the_run_identity(tmp_path) -> None:
    """A resume on another machine (or with another count) is allowed: the count changes no number
    beyond float reduction order."""
    config = task_config(tmp_path, "seq-cls")
    one, two = (TrainConfig.from_yaml(config, [f"threads={count}"]) for count in (1, 2))
    assert run_record(one, [], 1)["fingerprint"] == run_record(two, [], 1)["fingerprint"]
    assert run_record(one, [], 1)["config"]["threads"] == 1
