"""`deltatune train --resume`: a run continued from a mid-run checkpoint ends bit-exactly where an
uninterrupted run ends (weights, optimizer moments, schedule, data order and dropout masks)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.cli import main
from training_fixtures import task_config

SETTINGS = {
    "adapter": {"method": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.2},
    "batch_size": 4,
    "max_steps": 8,
    "save_every": 3,
    "scheduler": "linear",
    "warmup_steps": 2,
    "eval_file": None,
}


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("resume_from", ["latest", "explicit"])
def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(resume_from: str, tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", **SETTINGS)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", str(config), f"output_dir={whole}", "--quiet"]) == 0
    assert main(["train", str(config), f"output_dir={cut}", "--quiet"]) == 0
    # The interrupted run: keep only the checkpoint of step 3, as if the process had died at step 4.
    for later in (cut / "checkpoints").glob("step-*"):
        if later.name != "step-000003":
            shutil.rmtree(later)
    shutil.rmtree(cut / "adapter")
    (cut / "metrics.json").unlink()
    resume = ["--resume"] if resume_from == "latest" else ["--resume", str(cut / "checkpoints" / "step-000003")]
    assert main(["train", str(config), f"output_dir={cut}", "--quiet", *resume]) == 0

    expected, resumed = adapter_tensors(whole), adapter_tensors(cut)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    history = [json.loads((folder / "metrics.json").read_text())["history"] for folder in (whole, cut)]
    assert history[0] == history[1]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **SETTINGS)
    assert main(["train", str(config), "--resume", "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
