"""LoRA's `lora_bias` (a trained bias on B) and `bias="all" | "lora_only"` (the base's biases train)
against peft 0.21 with the same weights: outputs within 1e-5, folders both ways holding exactly peft's
keys, merges equal to peft's merge_and_unload, the same trainable parameter count; tiny Llama (no
biases), GPT-2, BERT and a convolution.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.train.cli import main
from resume_checks import RESUME_SETTINGS
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "dense"]}
OPTIONS = {
    "lora_bias": {"lora_bias": True},
    "all": {"bias": "all"},
    "lora_only": {"bias": "lora_only"},
    "lora_bias-all": {"lora_bias": True, "bias": "all"},
}
CASES = [
    pytest.param(arch, option, id=f"{option}-{arch}")
    for arch in ("llama", "gpt2", "bert")
    for option in OPTIONS
    if arch != "llama" or option == "lora_bias"  # Llama has no bias for bias= to train
]
MERGEABLE = [case for case in CASES if case.values[0] != "llama"]  # peft cannot merge b_B without a base bias


def peft_model(arch: str, option: str) -> peft.PeftModel:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(TARGETS[arch]), init_lora_weights=False, **OPTIONS[option]
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(build(arch)), config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def our_model(arch: str, option: str) -> deltatune.DeltaModel:
    config = deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(TARGETS[arch]), init_lora_weights=False, **OPTIONS[option]
    )
    torch.manual_seed(1)
    model = deltatune.attach(build(arch), config)
    with torch.no_grad():
        for parameter in model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def bias_changes(model: nn.Module, arch: str) -> float:
    """How far the output is from the same model without its bias terms, so a test proves something."""
    return (run(model, arch) - run(build(arch), arch)).abs().max().item()


@pytest.mark.parametrize("arch,option", CASES)
def test_a_peft_folder_loads_with_peft_outputs(arch: str, option: str, tmp_path: Path) -> None:
    theirs = peft_model(arch, option)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(build(arch), str(tmp_path))
    assert bias_changes(theirs, arch) > 1e-3
    assert_same(run(ours, arch), run(theirs, arch))


@pytest.mark.parametrize("arch,option", CASES)
def test_our_folder_loads_in_peft_with_our_outputs_and_holds_peft_keys(arch: str, option: str, tmp_path: Path) -> None:
    ours = our_model(arch, option)
    ours.save(str(tmp_path / "ours"), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(build(arch)), str(tmp_path / "ours")).eval()
    assert_same(run(theirs, arch), run(ours, arch))
    peft_model(arch, option).save_pretrained(str(tmp_path / "peft"))
    shapes = {key: t.shape for key, t in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    expected = {key: t.shape for key, t in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    assert shapes == expected


@pytest.mark.parametrize("arch,option", CASES)
def test_the_same_parameters_train_as_in_peft(arch: str, option: str) -> None:
    theirs = peft_model(arch, option)
    ours = our_model(arch, option)
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch,option", MERGEABLE)
def test_merge_equals_unmerged_and_peft_merge_and_unload(arch: str, option: str, tmp_path: Path) -> None:
    theirs = peft_model(arch, option)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(build(arch), str(tmp_path))
    unmerged = run(ours, arch)
    ours.merge()
    assert_same(run(ours, arch), unmerged)
    ours.unmerge()
    assert_same(run(ours, arch), unmerged)
    assert_same(run(ours.unload(merge=True), arch), unmerged)
    assert_same(run(theirs.merge_and_unload(), arch), unmerged)


def test_b_bias_on_layers_without_a_bias_merges_into_a_new_bias() -> None:
    """peft refuses this merge; here the layer gets a bias holding s·b_B (as BitFit's add_missing_bias)."""
    ours = our_model("llama", "lora_bias")
    unmerged = run(ours, "llama")
    merged = ours.unload(merge=True)
    assert merged.model.layers[0].self_attn.q_proj.bias is not None
    assert_same(run(merged, "llama"), unmerged)


def test_a_trained_bias_acts_as_the_base_with_that_bias_and_the_file_holds_it(tmp_path: Path) -> None:
    ours = deltatune.attach(build("gpt2"), deltatune.LoraConfig(target_modules=["c_attn"], bias="all"))
    trained = ours.base_model.transformer.h[0].ln_1.deltatune.adapters["default"].bias
    with torch.no_grad():
        trained.add_(0.5 * torch.randn_like(trained))
    reference = build("gpt2")
    with torch.no_grad():  # the plain computation: the base with that bias written in
        reference.transformer.h[0].ln_1.bias.copy_(trained)
    assert_same(run(ours, "gpt2"), run(reference, "gpt2"))
    assert bias_changes(reference, "gpt2") > 1e-3
    with ours.disabled():  # the base model, unlike peft, whose disabled adapter keeps the trained biases
        assert torch.equal(run(ours, "gpt2"), run(build("gpt2"), "gpt2"))
    ours.save(str(tmp_path))
    assert torch.equal(load_file(str(tmp_path / "adapter_model.safetensors"))["transformer.h.0.ln_1.bias"], trained)


def test_lora_bias_on_a_convolution_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], lora_bias=True, bias="all", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(model), str(tmp_path))
    inputs = torch.randn(2, 3, 6, 6)
    assert_same(ours(inputs), theirs(inputs))
    assert_same(ours.unload(merge=True)(inputs), theirs(inputs))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options,message",
    [
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, r"lora_bias=True needs init_lora_weights=True or False"),
        ({"lora_bias": True, "use_dora": True}, r"not implemented with DoRA"),
        ({"bias": "all", "use_dora": True}, r"not implemented with DoRA"),
    ],
    ids=["gaussian", "dora", "dora-bias"],
)
def test_combinations_peft_or_deltatune_do_not_compute_are_refused(options: dict, message: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.LoraConfig(**options)


def test_lora_bias_on_an_embedding_is_refused_as_in_peft() -> None:
    config = deltatune.LoraConfig(target_modules=["embed_tokens"], lora_bias=True)
    with pytest.raises(deltatune.UnsupportedModuleError, match=r"lora_bias=True is not supported on Embedding"):
        deltatune.attach(build("llama"), config)


def test_bias_all_refuses_a_bias_it_cannot_train_as_a_delta() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(deltatune.UnsupportedModuleError, match=r"'1' \(BatchNorm1d\).*bias='lora_only'"):
        deltatune.attach(model, deltatune.LoraConfig(target_modules=["0"], bias="all"))


def test_bias_must_be_one_of_peft_values() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="bias"):
        deltatune.LoraConfig(bias="some")


@pytest.mark.parametrize("options", [{"lora_bias": True}, {"bias": "all"}, {"trainable_token_indices": [3, 4]}])
def test_add_weighted_adapter_refuses_adapters_with_biases_or_token_rows(options: dict) -> None:
    model = deltatune.attach(build("gpt2"), deltatune.LoraConfig(r=4, **options), name="a")
    model.add("b", deltatune.LoraConfig(r=4))
    with pytest.raises(deltatune.DeltaTuneError, match=r"and a also train biases or token rows"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" not in model.configs


def test_training_from_yaml_with_lora_bias_and_all_biases_loss_falls(tmp_path: Path) -> None:
    adapter = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_bias": True}
    config = task_config(tmp_path, "seq-cls", method={**adapter, "bias": "all"}, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_lora_checkpoint_that_predates_these_fields_resumes_with_them_off(tmp_path: Path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS)
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    state_file = tmp_path / "out" / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for name in ("adapter.lora_bias", "adapter.bias", "adapter.trainable_token_indices"):
        del state["run"]["fingerprint"][name]  # as a checkpoint written before these fields existed
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", "adapter.lora_bias=true"]) == 2
    assert "adapter.lora_bias: false → true" in capsys.readouterr().err
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
