"""One run at a time in an output folder: a second `deltatune train`, `compare` or `demo` into a folder another
run holds refuses at its start in one line naming the folder and the holder's pid, before any model loads; a
lock file left by a process that is gone is taken over with a warning; a Ctrl-C leaves no lock; a distributed
run's other ranks take none; a process that holds a folder's lock takes it again freely."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltatune.errors import OutputFolderError
from deltatune.train import loop
from deltatune.train.cli import main
from training_fixtures import model_folder, task_config

LOCK_FILE = ".deltatune-lock"
HOLDER = (
    "import fcntl, os, sys\n"
    "descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(descriptor, fcntl.LOCK_EX)\n"
    "os.write(descriptor, str(os.getpid()).encode())\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)
"""Another process holding a folder's lock (as a running deltatune run does) until its stdin closes."""


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(the folder `tmp_path/out`, locked by another process; that process's pid)."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    yield out, holder.pid
    holder.stdin.close()
    holder.wait(timeout=60)


def _train(tmp_path: Path, out: Path) -> list[str]:
    return ["train", str(task_config(tmp_path, "causal-lm", output_dir=out, max_steps=1)), "--quiet"]


def _compare(tmp_path: Path, out: Path) -> list[str]:
    config = task_config(tmp_path, "causal-lm", output_dir=out, max_steps=1)
    return ["compare", str(config), "--methods", "lora,full", "--quiet"]


def _demo(tmp_path: Path, out: Path) -> list[str]:
    model = model_folder(tmp_path, "causal-lm")
    return ["demo", "--out", str(out), "--model", str(model), "--steps", "1", "--examples", "2"]


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {"train": _train, "compare": _compare, "demo": _demo}
"""Entry point → its command line writing into the folder given."""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_run_into_a_locked_folder_refuses_at_its_start_naming_the_folder_and_the_holder(
    command: str, held: tuple[Path, int], tmp_path: Path, monkeypatch, capsys
) -> None:
    out, pid = held

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the lock was taken")

    monkeypatch.setattr(loop, "load_model", no_model)
    arguments = COMMANDS[command](tmp_path, out)
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err
    line = error.strip().splitlines()[-1]
    assert "Traceback" not in error and error.count("deltatune:") == 1, error
    assert line == (
        f"deltatune: output_dir {out} is in use by another run (pid {pid}); wait for it to end, or give another "
        "output_dir"
    )
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]  # nothing written


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(gone.stdout)  # a run killed with its lock file in place
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert main(_train(tmp_path, out)) == 0
    said = [record.getMessage() for record in caplog.records if LOCK_FILE in record.getMessage()]
    assert len(said) == 1 and f"(pid {gone.stdout.strip()})" in said[0] and "taking it over" in said[0], said
    assert (out / "adapter").is_dir() and not (out / LOCK_FILE).exists()


def test_a_ctrl_c_leaves_no_lock_and_the_next_run_takes_it_without_a_warning(tmp_path: Path, caplog) -> None:
    from deltatune.train.output_lock import output_lock

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), output_lock(out):
        raise KeyboardInterrupt
    assert not (out / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="deltatune"), output_lock(out):
        assert (out / LOCK_FILE).read_text().strip().isdigit()
    assert not caplog.records and not (out / LOCK_FILE).exists()


def test_a_process_holding_the_lock_takes_it_again_and_other_ranks_take_none(
    held: tuple[Path, int], tmp_path: Path
) -> None:
    from deltatune.train.output_lock import output_lock

    out, pid = held
    with output_lock(out, main=False):  # a distributed run's other rank, beside its main one
        pass
    with pytest.raises(OutputFolderError, match=f"pid {pid}"), output_lock(out):
        pass
    mine = tmp_path / "mine"
    with output_lock(mine), output_lock(mine):  # the demo, then the trainer it runs
        assert (mine / LOCK_FILE).is_file()
    assert not (mine / LOCK_FILE).exists()
