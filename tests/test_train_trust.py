"""Training never goes wrong silently: a run whose loss or gradient turns non-finite stops at that step
with one line and a non-zero exit, saves no broken adapter and keeps its last good checkpoint; the
JSON files it writes are strict JSON; an output folder that cannot be written stops the run before
the model loads; a classification data set with a single label is refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import DeltaTuneError
from deltatune.train import loop
from deltatune.train.checkpoint import TrainerState, save_checkpoint, trainable_parameters
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.report import write_report
from training_fixtures import records, task_config, write_jsonl


def strict_json(path: Path) -> dict:
    """The file parsed by a parser that refuses NaN and Infinity, as every non-Python reader does."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_a_diverged_run_stops_at_that_step_and_keeps_its_last_good_checkpoint(
    max_grad_norm: float | None, tmp_path, capsys
) -> None:
    # A learning rate of 1e10 turns the tiny BERT's loss NaN at step 2.
    config = task_config(
        tmp_path, "token-cls", learning_rate=1e10, max_grad_norm=max_grad_norm, save_every=1, eval_file=None
    )
    assert main(["train", str(config), "--quiet"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("deltatune: training diverged at step 2") and "learning rate" in line, line
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert [path.name for path in sorted((out / "checkpoints").iterdir())] == ["step-000001"]
    kept = load_file(str(out / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors"))
    assert kept and all(torch.isfinite(tensor).all() for tensor in kept.values())


def test_non_finite_weights_in_the_model_stop_the_run_at_step_one(tmp_path) -> None:
    run = loop.prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", eval_file=None)))
    with torch.no_grad():
        run.delta_model.base_model.model.norm.weight[0] = math.nan
    with pytest.raises(DeltaTuneError, match="at step 1.*before any update"):
        loop.train_run(run, progress=False)
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_step_that_leaves_non_finite_weights_saves_no_adapter(tmp_path, monkeypatch) -> None:
    """The loss and gradient of the last step were finite, but its update was not."""
    run = loop.prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", eval_file=None, max_steps=2)))
    real_step = torch.optim.AdamW.step

    def step_into_infinity(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(math.inf)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_into_infinity)
    with pytest.raises(DeltaTuneError, match="step 2"):
        loop.train_run(run, progress=False)
    assert not (tmp_path / "out" / "adapter").exists()


def test_metrics_and_trainer_state_are_strict_json_even_with_non_finite_values(tmp_path) -> None:
    run = loop.prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", eval_file=None)))
    history = [{"step": 1, "loss": math.nan, "learning_rate": 0.02}, {"step": 1, "eval_loss": math.inf}]
    write_report(
        tmp_path / "report",
        task="causal-lm",
        method="lora",
        parameters=run.delta_model.trainable_summary(),
        history=history,
        final_metrics={},
        seconds=1.0,
        main_metric="exact_match",
    )
    assert strict_json(tmp_path / "report" / "metrics.json")["history"] == [
        {"step": 1, "loss": None, "learning_rate": 0.02},
        {"step": 1, "eval_loss": None},
    ]

    parameters = [parameter for _, parameter in trainable_parameters(run.delta_model)]
    optimizer = torch.optim.AdamW(parameters, lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "step", run.delta_model, optimizer, scheduler, TrainerState(step=1, history=history))
    assert strict_json(tmp_path / "step" / "trainer_state.json")["history"][1] == {"step": 1, "eval_loss": None}


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    return tmp_path / "taken"


def _read_only(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


UNWRITABLE = {
    "a-file": _a_file,
    "inside-a-file": lambda tmp_path: _a_file(tmp_path) / "out",
    "read-only": _read_only,
}


@pytest.mark.parametrize("where", list(UNWRITABLE))
def test_an_output_dir_that_cannot_be_written_stops_the_run_before_the_model_loads(
    where: str, tmp_path, monkeypatch, capsys
) -> None:
    output_dir = UNWRITABLE[where](tmp_path)
    config = task_config(tmp_path, "causal-lm", output_dir=output_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    assert main(["train", str(config), "--quiet"]) == 2
    line = last_error_line(capsys)
    assert line.startswith(f"deltatune: output_dir {output_dir}") and "cannot be written" in line, line


def test_a_classification_data_set_with_a_single_label_is_refused(tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "one-label.jsonl", [{**row, "label": "yes"} for row in records("seq-cls")])
    config = task_config(tmp_path, "seq-cls", train_file=data, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 2
    line = last_error_line(capsys)
    assert "only one label, 'yes'" in line and "at least two" in line, line
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_run_whose_gradient_vanishes_at_a_positive_loss_stops_instead_of_saving_a_dead_adapter(
    tmp_path, capsys
) -> None:
    # A learning rate of 1e10 saturates the tiny Llama at its first update: from step 2 on its loss
    # sticks at ln(vocabulary) with a gradient of exactly zero, finite but untrainable.
    config = task_config(tmp_path, "causal-lm", learning_rate=1e10, eval_file=None, max_steps=6)
    assert main(["train", str(config), "--quiet"]) == 2
    line = last_error_line(capsys)
    assert "the gradient is exactly zero" in line and "learning rate" in line, line
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("save_every, stopped_at", [(2, 2), (None, 4)], ids=["at-a-checkpoint", "at-the-end"])
def test_a_step_that_leaves_the_optimizer_state_non_finite_stops_the_run_as_diverged(
    save_every: int | None, stopped_at: int, tmp_path, monkeypatch, capsys
) -> None:
    """An exp_avg_sq of inf makes every later AdamW update of its elements exactly 0 while the loss, the
    gradient and the weights stay finite: the run would train nothing and end with exit 0. It is checked
    where the weights are: before each checkpoint and before the adapter is saved."""
    config = task_config(tmp_path, "causal-lm", eval_file=None, max_steps=4, save_every=save_every)
    real_step = torch.optim.AdamW.step

    def overflow_second_moment(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        first = self.param_groups[0]["params"][0]
        if self.state[first]["step"] == 1:
            self.state[first]["exp_avg_sq"].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflow_second_moment)
    assert main(["train", str(config), "--quiet"]) == 2
    line = last_error_line(capsys)
    assert line.startswith(f"deltatune: training diverged at step {stopped_at}: "), line
    assert "exp_avg_sq" in line and "no adapter was saved" in line, line
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "checkpoints" / "step-000002").exists()
