"""`deltatune train --resume`: a run continued from a mid-run checkpoint ends bit-exactly where an
uninterrupted run ends (weights, optimizer moments, schedule, data order and dropout masks)."""

from __future__ import annotations

import pytest

from deltatune.train.cli import main
from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
from training_fixtures import task_config

SETTINGS = RESUME_SETTINGS


@pytest.mark.parametrize("resume_from", ["latest", "explicit"])
def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(resume_from: str, tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", **SETTINGS)
    assert_resume_equals_the_uninterrupted_run(config, tmp_path, explicit=resume_from == "explicit")


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **SETTINGS)
    assert main(["train", str(config), "--resume", "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


PROMPT_ENCODERS = {
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 8, "encoder_dropout": 0.2},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": True},
}
"""Methods whose peft folder keeps only what their encoder computes: a run's checkpoint keeps the encoder."""


@pytest.mark.parametrize("method", list(PROMPT_ENCODERS))
def test_resume_of_a_method_with_a_prompt_encoder_equals_an_uninterrupted_run(method: str, tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", **{**SETTINGS, "adapter": PROMPT_ENCODERS[method]})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)
