"""The run identity records the loss terms `deltatune train` adds to the task loss (`loss_added_by_trainer`
in `train/fingerprint.py`): a checkpoint written before the trainer added KaSA's regulariser trained on
another loss, so its resume is refused in one line, while checkpoints of runs whose loss did not change
(plain LoRA; MonteCLoRA, whose regulariser the trainer always added) still resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deltatune.train.cli import main
from resume_checks import RESUME_SETTINGS
from training_fixtures import task_config

ADAPTERS = {
    "kasa": {"kasa_config": {"beta": 1.0, "gamma": 1.0}},
    "monteclora": {"monteclora_config": {"num_samples": 2}},
    "plain": {},
}
"""A LoRA variant → its settings; `kasa`'s regulariser came to `deltatune train` after checkpoints existed."""


def written_before_the_key_existed(tmp_path: Path, variant: str) -> Path:
    """A run's config, with its checkpoint's fingerprint stripped of `loss_added_by_trainer.*`."""
    adapter = {**RESUME_SETTINGS["adapter"], **ADAPTERS[variant]}
    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, "adapter": adapter})
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    state_file = tmp_path / "out" / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    fingerprint = state["run"]["fingerprint"]
    state["run"]["fingerprint"] = {
        name: value for name, value in fingerprint.items() if not name.startswith("loss_added_by_trainer")
    }
    state_file.write_text(json.dumps(state))
    return config


def test_a_kasa_checkpoint_from_before_the_trainer_added_its_regulariser_is_refused(tmp_path: Path, capsys) -> None:
    config = written_before_the_key_existed(tmp_path, "kasa")
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert error.startswith("deltatune: --resume:") and "loss_added_by_trainer.kasa_config: false → true" in error


@pytest.mark.parametrize("variant", ["monteclora", "plain"])
def test_a_checkpoint_whose_loss_the_trainer_did_not_change_resumes_without_the_key(
    tmp_path: Path, variant: str
) -> None:
    config = written_before_the_key_existed(tmp_path, variant)
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
