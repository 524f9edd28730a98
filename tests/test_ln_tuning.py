"""LayerNorm tuning against peft 0.21's LN_TUNING with the same weights: default targets, outputs,
gradients, folders both ways (tensor keys and shapes exactly peft's), merges, mixed batches with LoRA,
bfloat16 models and training through `deltatune train`.

The norm copies are perturbed on whichever side builds the adapter: a fresh copy equals the layer and
would prove nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.methods.ln_tuning import NormCopy
from deltatune.train.cli import main
from test_ia3 import assert_changed
from test_peft_crosscheck import assert_same, assert_same_parameter, our_lora
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCHS = ["llama", "gpt2", "bert", "t5"]
TARGETS = {"bert": ["LayerNorm"]}
"""peft has no default norm layers for BERT; the others use peft's defaults."""


def perturb(model: nn.Module, marker: str) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if marker in name:
                parameter.add_(0.3 * torch.randn_like(parameter))


def peft_ln(arch: str) -> peft.PeftModel:
    config = peft.LNTuningConfig(target_modules=copy.deepcopy(TARGETS.get(arch)))
    theirs = peft.get_peft_model(copy.deepcopy(build(arch)), config)
    perturb(theirs, "ln_tuning_layers")
    return theirs.eval()


def our_ln(arch: str) -> deltatune.DeltaModel:
    ours = deltatune.attach(copy.deepcopy(build(arch)), deltatune.LNTuningConfig(target_modules=TARGETS.get(arch)))
    for copied in copies(ours).values():
        perturb(copied, "")
    return ours.eval()


def copies(ours: deltatune.DeltaModel, adapter: str = "default") -> dict[str, NormCopy]:
    found = {name: site.adapters[adapter] for name, site in ours.sites() if adapter in site.adapters}
    return {name: held for name, held in found.items() if isinstance(held, NormCopy)}


def ours_from_peft(theirs: peft.PeftModel, arch: str, folder: Path, trainable: bool = False) -> deltatune.DeltaModel:
    theirs.save_pretrained(folder)
    return deltatune.load(copy.deepcopy(build(arch)), str(folder), trainable=trainable).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_default_targets_are_peft_s(arch: str) -> None:
    theirs = peft.get_peft_model(copy.deepcopy(build(arch)), peft.LNTuningConfig())
    assert sorted(copies(our_ln(arch))) == sorted(theirs.targeted_module_names)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_ln_tuning_folder_loads_with_peft_outputs(arch: str, tmp_path: Path) -> None:
    theirs = peft_ln(arch)
    expected = run(theirs, arch)
    assert_changed(expected, run(build(arch), arch))
    assert_same(run(ours_from_peft(theirs, arch, tmp_path), arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_ln_tuning_folder_loads_in_peft_with_our_outputs_and_peft_s_tensor_keys(arch: str, tmp_path: Path) -> None:
    ours = our_ln(arch)
    expected = run(ours, arch)
    assert_changed(expected, run(build(arch), arch))
    ours.save(str(tmp_path / "ours"), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(build(arch)), str(tmp_path / "ours")).eval()
    assert_same(run(theirs, arch), expected)
    peft_ln(arch).save_pretrained(tmp_path / "theirs")
    saved = {key: tensor.shape for key, tensor in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    reference = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert saved == {key: tensor.shape for key, tensor in reference.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ln_tuning_gradients_match_peft(arch: str, tmp_path: Path) -> None:
    theirs = peft_ln(arch)
    ours = ours_from_peft(theirs, arch, tmp_path, trainable=True)
    theirs.train()
    ours.train()
    torch.manual_seed(3)
    run(theirs, arch).square().mean().backward()
    torch.manual_seed(3)
    run(ours, arch).square().mean().backward()
    for module_name, held in copies(ours).items():
        peft_copy = theirs.base_model.model.get_submodule(module_name).ln_tuning_layers["default"]
        for name, parameter in held.copy.named_parameters():
            expected = peft_copy.get_parameter(name).grad
            assert expected is not None and expected.abs().max() > 0
            assert_same_parameter(parameter.grad, expected, f"{module_name}.{name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_ln_tuning_merge_writes_the_copy_as_peft_and_unmerge_restores_the_layer(arch: str, tmp_path: Path) -> None:
    theirs = peft_ln(arch)
    ours = ours_from_peft(theirs, arch, tmp_path)
    unmerged = run(ours, arch)
    base_weights = {name: value.clone() for name, value in ours.base_model.state_dict().items()}
    ours.merge()
    assert_same(run(ours, arch), unmerged)
    merged_theirs = theirs.merge_and_unload()
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)
    ours.unmerge()
    assert_same(run(ours, arch), unmerged)
    for name, value in ours.base_model.state_dict().items():
        if name in base_weights:
            torch.testing.assert_close(value, base_weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_of_ln_tuning_and_lora_rows_equals_separate_runs(arch: str) -> None:
    ours = our_ln(arch)
    ours.add("lora", our_lora("all-linear"))
    expected = {}
    for name in ("default", "lora"):
        ours.activate(name)
        expected[name] = run(ours, arch)
    base = run(build(arch), arch)
    mixed = run(ours, arch, adapter_names=["default", None, "lora"])
    torch.testing.assert_close(mixed[0], expected["default"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[2], expected["lora"][2], atol=1e-6, rtol=1e-5)


def test_a_model_without_peft_defaults_needs_target_modules() -> None:
    with pytest.raises(deltatune.TargetNotFoundError, match="LNTuningConfig needs target_modules"):
        deltatune.attach(build("bert"), deltatune.LNTuningConfig())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_on_a_bfloat16_model_the_copies_keep_its_dtype_as_peft_s_and_mixed_rows_equal_separate_runs(
    arch: str, tmp_path: Path
) -> None:
    """peft does not upcast LN tuning's copies (they run in the layer's place: a float32 norm would hand
    the next bfloat16 layer float32 activations); neither does deltatune."""
    theirs = peft.get_peft_model(copy.deepcopy(build(arch)).to(torch.bfloat16), peft.LNTuningConfig())
    perturb(theirs, "ln_tuning_layers")
    theirs.eval().save_pretrained(tmp_path)
    ours = deltatune.load(build(arch).to(torch.bfloat16), str(tmp_path), name="a").eval()
    ours.add("b", deltatune.LNTuningConfig())
    assert {parameter.dtype for name in ("a", "b") for parameter in ours.adapter_parameters(name)} == {torch.bfloat16}
    expected = run(theirs, arch)
    ours.activate("a")
    assert_same(run(ours, arch), expected)
    base = run(build(arch).to(torch.bfloat16), arch)
    mixed = run(ours, arch, adapter_names=["a", None, "b"])
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed[0], expected[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(mixed[1], base[1], atol=0.05, rtol=0.02)


def test_ln_tuning_trains_through_the_command_and_its_loss_falls(tmp_path: Path) -> None:
    assert main(["train", str(task_config(tmp_path, "causal-lm", method={"method": "ln_tuning"})), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
