"""(IA)³ against peft 0.21's with the same weights: outputs, gradients, folders both ways, merges, mixed
batches with LoRA, convolutions, a 4-bit base, and training through `deltatune train`.

peft's vectors are drawn at random (`init_ia3_weights=False`) and moved to deltatune through peft's own
folder (or the other way round); at ones the adapter would be the identity and prove nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, TargetNotFoundError, UnsupportedModuleError
from deltatune.methods.ia3 import IA3InputScale, IA3OutputScale, IA3Scale
from deltatune.train.cli import main
from test_peft_crosscheck import assert_same, assert_same_parameter, our_lora
from test_quantized import needs_bitsandbytes
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCHS = ["llama", "gpt2", "bert", "t5"]
TASK = {"bert": {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}}
"""peft's defaults per arch; BERT's classifier trains (peft lists it in `modules_to_save` for SEQ_CLS)."""


def assert_changed(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """The adapter really moves the output (by over 1 % of its size: BERT's classifier logits are small)."""
    assert (actual - reference).abs().max() > 0.01 * reference.abs().max()


def peft_ia3(arch: str, **options) -> peft.PeftModel:
    config = peft.IA3Config(init_ia3_weights=False, **copy.deepcopy({**TASK.get(arch, {}), **options}))
    return peft.get_peft_model(copy.deepcopy(build(arch)), config).eval()


def our_ia3(arch: str, **options) -> deltatune.DeltaModel:
    fields = {key: value for key, value in {**TASK.get(arch, {}), **options}.items() if key != "task_type"}
    return deltatune.attach(copy.deepcopy(build(arch)), deltatune.IA3Config(init_ia3_weights=False, **fields)).eval()


def ours_from_peft(theirs: peft.PeftModel, arch: str, folder: Path, trainable: bool = False) -> deltatune.DeltaModel:
    theirs.save_pretrained(folder)
    return deltatune.load(copy.deepcopy(build(arch)), str(folder), trainable=trainable).eval()


def scales(ours: deltatune.DeltaModel, adapter: str = "default") -> dict[str, IA3Scale]:
    found = {name: site.adapters[adapter] for name, site in ours.sites() if adapter in site.adapters}
    return {name: scale for name, scale in found.items() if isinstance(scale, IA3Scale)}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_and_feedforward_layers_are_peft_s(arch: str) -> None:
    theirs = peft_ia3(arch)
    ours = our_ia3(arch)
    peft_layers = {
        name: module.is_feedforward
        for name, module in theirs.base_model.model.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer)
    }
    assert {name: isinstance(scale, IA3InputScale) for name, scale in scales(ours).items()} == peft_layers
    assert any(peft_layers.values()) and not all(peft_layers.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_ia3_folder_loads_with_peft_outputs(arch: str, tmp_path: Path) -> None:
    theirs = peft_ia3(arch)
    expected = run(theirs, arch)
    assert_changed(expected, run(build(arch), arch))
    ours = ours_from_peft(theirs, arch, tmp_path)
    assert_same(run(ours, arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_ia3_folder_loads_in_peft_with_our_outputs(arch: str, tmp_path: Path) -> None:
    ours = our_ia3(arch)
    expected = run(ours, arch)
    assert_changed(expected, run(build(arch), arch))
    ours.save(str(tmp_path), format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(build(arch)), str(tmp_path)).eval()
    assert_same(run(theirs, arch), expected)
    assert sorted(theirs.targeted_module_names) == sorted(ours.targets["default"])
    for name, scale in scales(ours).items():
        assert theirs.base_model.model.get_submodule(name).ia3_l["default"].shape == scale.ia3_l.shape


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_gradients_match_peft(arch: str, tmp_path: Path) -> None:
    theirs = peft_ia3(arch)
    ours = ours_from_peft(theirs, arch, tmp_path, trainable=True)
    theirs.train()
    ours.train()
    torch.manual_seed(3)  # the same dropout masks in the base model (GPT-2)
    run(theirs, arch).square().mean().backward()
    torch.manual_seed(3)
    run(ours, arch).square().mean().backward()
    for name, scale in scales(ours).items():
        expected = theirs.base_model.model.get_submodule(name).ia3_l["default"].grad
        assert expected is not None and expected.abs().max() > 0
        assert_same_parameter(scale.ia3_l.grad, expected, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_merge_equals_unmerged_and_peft_merge_and_unmerge_subtracts_what_it_added(
    arch: str, tmp_path: Path
) -> None:
    theirs = peft_ia3(arch)
    ours = ours_from_peft(theirs, arch, tmp_path)
    unmerged = run(ours, arch)
    base_weights = {name: value.clone() for name, value in ours.base_model.state_dict().items()}
    ours.merge()
    merged_weights = {name: value.clone() for name, value in ours.base_model.state_dict().items()}
    assert_same(run(ours, arch), unmerged)
    merged_theirs = theirs.merge_and_unload()
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)
    adapted = scales(ours)
    kept = {
        f"{module}.{key}": delta
        for module, site in ours.sites()
        if module in adapted
        for key, delta in (site.merges["default"] or {}).items()
    }
    assert kept
    ours.unmerge()
    assert_same(run(ours, arch), unmerged)
    for name in kept:  # zero biases (GPT-2's at init) stay zero
        assert not torch.equal(merged_weights[name], base_weights[name]) or not base_weights[name].any()
        torch.testing.assert_close(ours.base_model.state_dict()[name], base_weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_of_ia3_and_lora_rows_equals_separate_runs(arch: str) -> None:
    """LoRA on every linear layer meets (IA)³'s input scale at the feed-forward layers."""
    ours = our_ia3(arch)
    ours.add("lora", our_lora("all-linear"))
    expected = {}
    for name in ("default", "lora"):
        ours.activate(name)
        expected[name] = run(ours, arch)
    base = run(build(arch), arch)
    mixed = run(ours, arch, adapter_names=["lora", "default", None])
    assert_changed(expected["default"], base)
    torch.testing.assert_close(mixed[0], expected["lora"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], expected["default"][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-6, rtol=1e-5)


def test_mixed_batch_input_scales_keep_their_gradients() -> None:
    """The rows' scale table is built out of place: each adapter's ∂l comes from its own rows only."""
    ours = our_ia3("llama")
    ours.add("other", deltatune.IA3Config(init_ia3_weights=False))
    ours.set_trainable("default")
    ours.set_trainable("other")
    ours.train()
    run(ours, "llama", adapter_names=["default", None, "default"]).square().mean().backward()
    gradients = {name: scale.ia3_l.grad for name, scale in scales(ours, "other").items()}
    assert all(gradient is None or gradient.abs().max() == 0 for gradient in gradients.values())
    assert all(scale.ia3_l.grad.abs().max() > 0 for scale in scales(ours).values())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 8, 3, groups=2)
        self.volume = nn.Conv3d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.grouped(self.first(x))
        return self.volume(hidden.view(hidden.shape[0], 2, 4, *hidden.shape[2:]))


@pytest.mark.parametrize("feedforward", [["first", "grouped", "volume"], []], ids=["input", "output"])
def test_ia3_on_conv2d_and_conv3d_matches_peft_merged_and_unmerged(feedforward, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    x = torch.randn(2, 4, 7, 7)
    targets = ["first", "grouped", "volume"]
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config)).eval()
    expected = theirs(x)
    assert_changed(expected, base(x))
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(ours(x), expected)
    ours.merge()
    assert_same(ours(x), expected)
    for name, parameter in theirs.merge_and_unload().named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)


@needs_bitsandbytes
def test_ia3_on_an_nf4_base_matches_peft_and_merges_into_the_dequantized_weights(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(build("llama-nf4"), peft.IA3Config(init_ia3_weights=False)).eval()
    expected = run(theirs, "llama-nf4")
    assert_changed(expected, run(build("llama-nf4"), "llama-nf4"))
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(build("llama-nf4"), str(tmp_path)).eval()
    assert_same(run(ours, "llama-nf4"), expected)
    plain = ours.unload(merge=True, dequantize=True)
    assert_same(run(plain, "llama-nf4"), expected)


def test_a_peft_folder_with_regular_expressions_for_targets_and_feedforward_layers_loads_with_peft_outputs(
    tmp_path: Path,
) -> None:
    theirs = peft_ia3("llama", target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=r".*\.down_proj")
    ours = ours_from_peft(theirs, "llama", tmp_path)
    assert sum(isinstance(scale, IA3InputScale) for scale in scales(ours).values()) == 2
    assert_same(run(ours, "llama"), run(theirs, "llama"))


def test_ia3_on_a_layer_type_peft_does_not_adapt_is_refused_naming_it() -> None:
    base = build("llama")
    with pytest.raises(UnsupportedModuleError, match=r"cannot adapt 'model.embed_tokens' \(Embedding\)") as raised:
        deltatune.attach(base, deltatune.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    assert "\n" not in str(raised.value)
    assert not [name for name, _ in base.named_modules() if name.endswith("deltatune")]


def test_a_feedforward_layer_outside_the_targets_is_refused() -> None:
    with pytest.raises(DeltaTuneError, match="feedforward_modules entry 'down_proj' is not in target_modules"):
        deltatune.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_a_model_without_peft_defaults_needs_feedforward_modules() -> None:
    with pytest.raises(TargetNotFoundError, match="IA3Config needs feedforward_modules"):
        deltatune.attach(build("mlp"), deltatune.IA3Config(target_modules=["net.0"]))
    ours = deltatune.attach(
        build("mlp"), deltatune.IA3Config(target_modules=["net.0", "net.2"], feedforward_modules=[])
    )
    assert all(isinstance(scale, IA3OutputScale) for scale in scales(ours).values())


def test_ia3_trains_through_the_command_and_its_loss_falls(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", method={"method": "ia3"})
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "ia3"
