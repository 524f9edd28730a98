"""`--resume` takes nothing non-finite from a checkpoint: a NaN or ±inf in its trainable weights or its optimizer
state (AdamW's exp_avg, exp_avg_sq, step) is refused in one line naming the tensor, its file and the checkpoint,
before any of its tensors is copied into the run, so training never continues from it (an exp_avg_sq of inf
makes every later AdamW update exactly 0: the run would end, exit 0, with the checkpoint's adapter)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
import deltatune.train.checkpoint as checkpoint
from deltatune.errors import TrainingDivergedError
from deltatune.train.cli import main
from tiny_models import build
from training_fixtures import task_config

POISONED = {
    "exp_avg_sq-inf": ("optimizer.safetensors", "exp_avg_sq", float("inf")),
    "exp_avg-nan": ("optimizer.safetensors", "exp_avg", float("nan")),
    "step-inf": ("optimizer.safetensors", "step", float("inf")),
    "weight-nan": ("trainable.safetensors", "lora_B", float("nan")),
    "weight-minus-inf": ("trainable.safetensors", "lora_A", float("-inf")),
}
"""Case → (checkpoint file, the first tensor whose key ends so, the value written into it)."""


def poison(folder: Path, file_name: str, key_end: str, value: float) -> str:
    """Write `value` into the first element of the first tensor of `folder/file_name` whose key ends with
    `key_end`; returns its key."""
    tensors = load_file(str(folder / file_name))
    key = next(key for key in sorted(tensors) if key.endswith(key_end))
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(folder / file_name))
    return key


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, output_dir) of a 4-step run that checkpointed at step 2 and stopped there (its adapter and
    metrics removed, as if killed at step 3)."""
    root = tmp_path_factory.mktemp("stopped")
    config = task_config(root, "causal-lm", max_steps=4, save_every=2, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    out = root / "out"
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    return config, out


@pytest.mark.parametrize("file_name, key_end, value", list(POISONED.values()), ids=list(POISONED))
def test_resume_refuses_a_checkpoint_holding_a_non_finite_value_naming_the_tensor(
    stopped_run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    file_name: str,
    key_end: str,
    value: float,
) -> None:
    config, stopped = stopped_run
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    step = out / "checkpoints" / "step-000002"
    key = poison(step, file_name, key_end, value)
    before = {path.name: path.read_bytes() for path in step.iterdir() if path.is_file()}
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", "--quiet", "--resume"]) == 2
    error = capsys.readouterr().err
    line = error.strip().splitlines()[-1]  # after the model's loading bars
    assert "Traceback" not in error and line.startswith("deltatune: --resume: ") and error.count("deltatune:") == 1
    assert f"{step / file_name}" in line and repr(key) in line and "non-finite" in line, line
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert {path.name: path.read_bytes() for path in step.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("file_name, key_end, value", list(POISONED.values()), ids=list(POISONED))
def test_a_refused_checkpoint_changes_no_weight_and_no_optimizer_state(
    tmp_path: Path, file_name: str, key_end: str, value: float
) -> None:
    """Every tensor is checked before the first copy: the resuming model keeps its weights (bit for bit) and
    its optimizer an empty state."""

    def adapted() -> tuple[deltatune.DeltaModel, torch.optim.Optimizer, object]:
        delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"]))
        optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=0.1)
        return delta_model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    trained, optimizer, scheduler = adapted()
    sum(parameter.sum() for parameter in trained.parameters() if parameter.requires_grad).backward()
    optimizer.step()
    folder = checkpoint.checkpoint_folder(tmp_path, 1)
    checkpoint.save_checkpoint(folder, trained, optimizer, scheduler, checkpoint.TrainerState(step=1))
    poison(folder, file_name, key_end, value)
    resuming, optimizer, scheduler = adapted()
    before = {name: parameter.detach().clone() for name, parameter in resuming.named_parameters()}
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        checkpoint.load_checkpoint(folder, resuming, optimizer, scheduler)
    assert all(torch.equal(parameter, before[name]) for name, parameter in resuming.named_parameters())
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize(
    "file_name", [checkpoint.BUFFERS_FILE, checkpoint.STEP_STATE_FILE], ids=["buffers", "step-state"]
)
def test_a_checkpoints_adapter_buffers_and_step_hook_state_holding_a_non_finite_value_are_refused(
    tmp_path: Path, file_name: str
) -> None:
    """The adapters' persistent buffers (VeLoRA's projection) and the step hooks' state (AdaLoRA's importance
    scores) are checked as the weights are."""
    delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"]))
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = checkpoint.checkpoint_folder(tmp_path, 1)
    checkpoint.save_checkpoint(folder, delta_model, optimizer, scheduler, checkpoint.TrainerState(step=1))
    save_file({"scores": torch.tensor([1.0, float("nan")])}, str(folder / file_name))
    read = {
        checkpoint.BUFFERS_FILE: lambda: checkpoint.load_checkpoint(folder, delta_model, optimizer, scheduler),
        checkpoint.STEP_STATE_FILE: lambda: checkpoint.read_step_state(folder),
    }[file_name]
    with pytest.raises(TrainingDivergedError, match=f"{file_name} holds non-finite values .* in 'scores'"):
        read()
