"""DoRA (`use_dora=True`) against peft's DoRA with the same weights: outputs, gradients, merges and folders.

peft's adapter is built with random, non-zero A and B (`init_lora_weights=False`) and moved to deltatune
through its own folder (or the other way round); the magnitudes are perturbed so that m differs from the
norm it starts at, or the DoRA rescaling would be the identity and prove nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune.methods.dora import DoraLinear
from test_peft_crosscheck import assert_changed, assert_same, assert_same_parameter, our_lora, peft_lora
from test_quantized import needs_bitsandbytes
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [("llama", ["q_proj", "v_proj"]), ("llama", "all-linear"), ("gpt2", "all-linear")]


def perturb_magnitudes(model: nn.Module) -> None:
    """m × (1 + 0.3 · noise) for every magnitude of either library."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.randn_like(parameter))


def peft_dora(arch: str, targets, **options) -> peft.PeftModel:
    theirs = peft.get_peft_model(copy.deepcopy(build(arch)), peft_lora(targets, use_dora=True, **options))
    perturb_magnitudes(theirs)
    return theirs.eval()


def our_dora(arch: str, targets, **options) -> deltatune.DeltaModel:
    ours = deltatune.attach(copy.deepcopy(build(arch)), our_lora(targets, use_dora=True, **options))
    perturb_magnitudes(ours)
    return ours.eval()


def ours_from_peft(theirs: peft.PeftModel, arch: str, folder: Path) -> deltatune.DeltaModel:
    theirs.save_pretrained(folder)
    return deltatune.load(copy.deepcopy(build(arch)), str(folder), trainable=True).eval()


def dora_adapters(ours: deltatune.DeltaModel) -> dict[str, DoraLinear]:
    return {name: site.adapters["default"] for name, site in ours.sites()}


def peft_tensors(theirs: peft.PeftModel, module_name: str) -> dict[str, torch.Tensor]:
    layer = theirs.base_model.model.get_submodule(module_name)
    return {
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight,
    }


def plain_dora_weight(module: nn.Module, adapter: DoraLinear) -> torch.Tensor:
    """W' = m (W + s B A) / ‖W + s B A‖ per output row, written out with torch's norm (out × in layout)."""
    weight = module.weight.detach().t() if adapter.transposed else module.weight.detach()
    combined = weight + adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
    return (
        adapter.lora_magnitude_vector.detach().unsqueeze(1)
        * combined
        / torch.linalg.norm(combined, dim=1, keepdim=True)
    )


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_peft_dora_folder_loads_with_peft_outputs(arch: str, targets, tmp_path: Path) -> None:
    theirs = peft_dora(arch, targets)
    expected = run(theirs, arch)
    assert_changed(expected, run(build(arch), arch))
    ours = ours_from_peft(theirs, arch, tmp_path)
    assert all(isinstance(adapter, DoraLinear) for adapter in dora_adapters(ours).values())
    assert_same(run(ours, arch), expected)


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_dora_gradients_of_a_b_and_magnitude_match_peft(arch: str, targets, tmp_path: Path) -> None:
    theirs = peft_dora(arch, targets)
    ours = ours_from_peft(theirs, arch, tmp_path)
    theirs.train()
    ours.train()
    torch.manual_seed(3)  # the same masks where the base model itself drops (GPT-2)
    run(theirs, arch).square().mean().backward()
    torch.manual_seed(3)
    run(ours, arch).square().mean().backward()
    for module_name, adapter in dora_adapters(ours).items():
        for tensor_name, expected in peft_tensors(theirs, module_name).items():
            assert expected.grad is not None and expected.grad.abs().max() > 0
            actual = getattr(adapter, tensor_name).grad
            assert_same_parameter(actual, expected.grad, f"{module_name}.{tensor_name}.grad")


def test_dora_with_dropout_matches_peft_under_the_same_seed(tmp_path: Path) -> None:
    """In training, the correction terms take the dropped input and the base path the undropped one."""
    theirs = peft_dora("llama", "all-linear", lora_dropout=0.3)
    ours = ours_from_peft(theirs, "llama", tmp_path)
    theirs.train()
    ours.train()
    torch.manual_seed(7)
    expected = run(theirs, "llama")
    torch.manual_seed(7)
    actual = run(ours, "llama")
    assert_changed(expected, run(theirs.eval(), "llama"))
    assert_same(actual, expected)


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_our_dora_folder_loads_in_peft_with_our_outputs(arch: str, targets, tmp_path: Path) -> None:
    ours = our_dora(arch, targets)
    expected = run(ours, arch)
    assert_changed(expected, run(build(arch), arch))
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(build(arch)), str(tmp_path)).eval()
    assert_same(run(theirs, arch), expected)
    assert sorted(theirs.targeted_module_names) == sorted(ours.targets["default"])


def test_dora_round_trips_through_our_format(tmp_path: Path) -> None:
    ours = our_dora("llama", "all-linear")
    expected = run(ours, "llama")
    ours.save(str(tmp_path))
    again = deltatune.load(copy.deepcopy(build("llama")), str(tmp_path)).eval()
    assert_same(run(again, "llama"), expected)


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_dora_merge_equals_unmerged_and_peft_merge_and_unmerge_restores_the_base(
    arch: str, targets, tmp_path: Path
) -> None:
    theirs = peft_dora(arch, targets)
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
def test_dora_weight_norm_equals_the_norm_of_the_materialised_weight(arch: str) -> None:
    ours = our_dora(arch, "all-linear")
    for module_name, adapter in dora_adapters(ours).items():
        module = ours.base_model.get_submodule(module_name)
        weight = module.weight.detach().t() if adapter.transposed else module.weight.detach()
        combined = weight + adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
        torch.testing.assert_close(
            adapter.weight_norm(module), torch.linalg.norm(combined, dim=1), atol=1e-5, rtol=1e-6
        )


def test_dora_output_equals_the_plain_formula_after_weights_change_in_eval_mode() -> None:
    """The eval-mode norm cache follows in-place changes of B and of the base weight."""
    ours = our_dora("llama", ["q_proj"])
    module_name, adapter = next(iter(dora_adapters(ours).items()))
    module = ours.base_model.get_submodule(module_name)
    x = torch.randn(3, module.in_features)
    for change in (lambda: None, lambda: adapter.lora_B.mul_(2.0), lambda: module.weight.add_(0.1)):
        with torch.no_grad():
            change()
            expected = torch.nn.functional.linear(x, plain_dora_weight(module, adapter), module.bias)
            assert_same(module(x), expected)
            assert_same(module(x), expected)  # the cached norm


def test_dora_training_lowers_the_loss_and_moves_the_magnitude() -> None:
    ours = our_dora("llama", ["q_proj", "v_proj"]).train()
    trainable = [parameter for parameter in ours.parameters() if parameter.requires_grad]
    magnitudes = {name: p.detach().clone() for name, p in ours.named_parameters() if "magnitude" in name}
    assert magnitudes and all(
        parameter.requires_grad for name, parameter in ours.named_parameters() if "magnitude" in name
    )
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = run(ours, "llama").square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any((ours.get_parameter(name) - value).abs().max() > 0 for name, value in magnitudes.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_at_the_default_init_equals_the_base_to_rounding(arch: str) -> None:
    ours = deltatune.attach(
        copy.deepcopy(build(arch)), deltatune.LoraConfig(target_modules="all-linear", use_dora=True)
    )
    torch.testing.assert_close(run(ours.eval(), arch), run(build(arch), arch), atol=1e-6, rtol=0)


@needs_bitsandbytes
def test_dora_on_an_nf4_base_matches_peft_outputs_gradients_and_dequantized_merge(tmp_path: Path) -> None:
    """The norm reads the dequantized weight; a merge goes into the dequantized copy (`unload(dequantize=True)`)."""
    theirs = peft.get_peft_model(build("llama-nf4"), peft_lora("all-linear", use_dora=True))
    perturb_magnitudes(theirs)
    theirs.eval()
    expected = run(theirs, "llama-nf4")
    assert_changed(expected, run(build("llama-nf4"), "llama-nf4"))
    ours = ours_from_peft(theirs, "llama-nf4", tmp_path)
    assert_same(run(ours, "llama-nf4"), expected)
    theirs.train()
    ours.train()
    run(theirs, "llama-nf4").square().mean().backward()
    run(ours, "llama-nf4").square().mean().backward()
    for module_name, adapter in dora_adapters(ours).items():
        for tensor_name, reference in peft_tensors(theirs, module_name).items():
            assert_same_parameter(getattr(adapter, tensor_name).grad, reference.grad, f"{module_name}.{tensor_name}")
    ours.eval()
    plain = ours.unload(merge=True, dequantize=True)
    assert_same(run(plain, "llama-nf4"), expected)
