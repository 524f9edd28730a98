"""A module that is both a target and in `modules_to_save` trains fully and gets no adapter, as in
peft (the saved copy wins; modules inside it get no adapter either): for peft folders, for our
configs, and for a task whose heads train fully under a method whose defaults reach them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.methods.module_copy import ModuleCopy
from deltatune.train.cli import main
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
CASES = {
    "head": ("bert", ["query", "value", "classifier"], ["classifier"], "classifier"),
    "block": ("llama", ["q_proj", "v_proj", "gate_proj"], ["layers.1.mlp"], "model.layers.1.mlp"),
}
"""Case → (arch, target_modules, modules_to_save, the full name of the saved module)."""


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable tensor (adapter weights and saved copies) moved off its start."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_folder_whose_target_is_also_saved_loads_with_peft_outputs(case: str, tmp_path: Path) -> None:
    arch, targets, saved, saved_name = CASES[case]
    base = build(arch)
    theirs = perturbed(
        peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=4, target_modules=list(targets), modules_to_save=list(saved), init_lora_weights=False),
        )
    )
    expected = run(theirs, arch)
    theirs.save_pretrained(str(tmp_path))

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(ours, arch), expected, atol=ATOL, rtol=0)
    assert sorted(ours.targets["default"]) == sorted(theirs.targeted_module_names)
    assert isinstance(dict(ours.sites())[saved_name].adapters["default"], ModuleCopy)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_whose_target_is_also_saved_adapts_what_peft_adapts(case: str, tmp_path: Path) -> None:
    arch, targets, saved, saved_name = CASES[case]
    base = build(arch)
    ours = perturbed(
        deltatune.attach(
            copy.deepcopy(base),
            deltatune.LoraConfig(
                r=4, target_modules=list(targets), modules_to_save=list(saved), init_lora_weights=False
            ),
        )
    )
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=list(targets), modules_to_save=list(saved))
    )
    assert sorted(ours.targets["default"]) == sorted(reference.targeted_module_names)
    assert not any(name == saved_name or name.startswith(saved_name + ".") for name in ours.targets["default"])

    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, arch), run(ours, arch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "task,arch",
    [("seq-cls", "bert"), ("token-cls", None), ("qa", None)],
    ids=["seq-cls-bert", "token-cls-bert", "qa-bert"],
)
def test_bitfit_with_default_targets_trains_a_task_head_through_the_command_line(
    task: str, arch: str | None, tmp_path: Path
) -> None:
    """The task puts its new head in modules_to_save; BitFit's default targets (every module with a
    bias) include it: the head trains fully, the other biases get BitFit."""
    config = task_config(tmp_path, task, method={"method": "bitfit"}, arch=arch)
    assert main(["train", str(config), "--quiet"]) == 0
    adapter = tmp_path / "out" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())["config"]["modules_to_save"]
    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    head = saved[0]
    assert {f"{head}.weight", f"{head}.bias"} <= keys
    assert any(key.endswith("query.bias") for key in keys)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
