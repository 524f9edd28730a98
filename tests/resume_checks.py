"""What the resume tests share: a short run that checkpoints every 3 steps, the same run interrupted
after its step-3 checkpoint and resumed, and the check that a resume with one setting switched is
refused naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.cli import main

RESUME_SETTINGS = {
    "adapter": {"method": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.2},
    "batch_size": 4,
    "max_steps": 8,
    "save_every": 3,
    "scheduler": "linear",
    "warmup_steps": 2,
    "eval_file": None,
}
"""8 steps with checkpoints at 3 and 6, dropout on: a resume must restore data order, RNG and optimizer."""


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


def assert_resume_equals_the_uninterrupted_run(config: Path, root: Path, explicit: bool = False) -> None:
    """Train `config` whole, and again stopped after step 3 (the later checkpoints, the adapter and the
    metrics removed, as if the process had died at step 4) then resumed (`--resume`, or `--resume
    FOLDER` if `explicit`): the two adapters are bit-identical and the histories equal."""
    whole, cut = root / "whole", root / "cut"
    assert main(["train", str(config), f"output_dir={whole}", "--quiet"]) == 0
    assert main(["train", str(config), f"output_dir={cut}", "--quiet"]) == 0
    for later in (cut / "checkpoints").glob("step-*"):
        if later.name != "step-000003":
            shutil.rmtree(later)
    shutil.rmtree(cut / "adapter")
    (cut / "metrics.json").unlink()
    resume = ["--resume", str(cut / "checkpoints" / "step-000003")] if explicit else ["--resume"]
    assert main(["train", str(config), f"output_dir={cut}", "--quiet", *resume]) == 0
    expected, resumed = adapter_tensors(whole), adapter_tensors(cut)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    history = [json.loads((folder / "metrics.json").read_text())["history"] for folder in (whole, cut)]
    assert history[0] == history[1]


def assert_resume_with_a_switched_setting_is_refused(
    config: Path, root: Path, capsys: pytest.CaptureFixture, override: str, said: str
) -> None:
    """A finished run of `config` in root/out, resumed with `override` (`key=value`): exit 2 and a last
    line that starts with `deltatune: --resume: ` and holds `said` (e.g. `packing: true → false`)."""
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(root / "out" / "adapter")
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", override]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("deltatune: --resume: ") and said in line, line
