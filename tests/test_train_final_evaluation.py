"""The end of a run: the trained adapter is on disk before the final evaluation, so an evaluation that
fails (an error, a Ctrl-C) loses no training; the failure is said in one line naming where the adapter is."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file

import deltatune.train.loop as loop
import deltatune.train.run_end as run_end
from deltatune.train.cli import main
from training_fixtures import model_folder, task_config

FAILURES = {
    "error": (RuntimeError("CUDA out of memory"), 2, "RuntimeError: CUDA out of memory"),
    "ctrl-c": (KeyboardInterrupt(), 130, "interrupted"),
}


def _adapter_weights(output_dir: Path) -> dict:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_final_evaluation_keeps_the_trained_adapter_saved(failure: str, tmp_path, monkeypatch, capsys):
    """The adapter saved is the one a run without evaluation trains (bit-identical), and exit is non-zero."""
    config = task_config(tmp_path, "causal-lm", max_steps=3)
    assert main(["train", str(config), "--quiet", "eval_file=null", f"output_dir={tmp_path / 'plain'}"]) == 0
    error, status, said = FAILURES[failure]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "evaluate", fail)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == status
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines of the model's load
    assert last.startswith("deltatune: ") and said in last and "Traceback" not in err, err
    assert f"the trained adapter is saved at {tmp_path / 'out' / 'adapter'}" in last, err
    expected, saved = _adapter_weights(tmp_path / "plain"), _adapter_weights(tmp_path / "out")
    assert saved.keys() == expected.keys() and all(saved[key].equal(expected[key]) for key in expected)


def test_a_final_evaluation_that_succeeds_puts_its_metrics_on_the_adapter_card(tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", max_steps=2)
    assert main(["train", str(config), "--quiet"]) == 0
    final = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["eval"]
    card = (tmp_path / "out" / "adapter" / "README.md").read_text(encoding="utf-8")
    assert final and all(name in card for name in final), card


def _train_command(tmp_path: Path) -> list[str]:
    config = task_config(tmp_path, "causal-lm", max_steps=1)
    return ["train", str(config), "--quiet", f"output_dir={tmp_path / 'elsewhere'}"]


def _demo_command(tmp_path: Path) -> list[str]:
    return ["demo", "--out", str(tmp_path / "demo"), "--model", str(model_folder(tmp_path, "causal-lm"))] + [
        *("--steps", "1", "--examples", "2")
    ]


ENTRY_POINTS = {"train": (_train_command, "elsewhere"), "demo": (_demo_command, "demo")}
"""Entry point → (its command line, the folder under tmp_path its adapter is saved in)."""


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_failed_final_evaluation_advises_a_command_that_evaluates_the_saved_adapter(
    entry_point: str, tmp_path, monkeypatch, capsys
) -> None:
    """`deltatune demo` has no config file, and `deltatune train` may have overrides: the advice is, for each, a
    command that works as written (run here once the cause is gone) and evaluates the adapter the run saved."""
    command, folder = ENTRY_POINTS[entry_point]

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(run_end, "evaluate_into", fail)
        assert main(command(tmp_path)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the trained adapter is saved at {tmp_path / folder / 'adapter'}" in last, last
    advice = last.split("`")[-2]
    assert advice.startswith("deltatune eval "), last
    assert main(shlex.split(advice)[1:]) == 0
    printed = capsys.readouterr().out
    assert "exact_match" in json.loads(printed[printed.rindex("{") :])  # the metrics, printed last
