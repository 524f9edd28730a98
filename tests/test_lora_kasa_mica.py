"""KaSA (`kasa_config`) and MiCA (`init_lora_weights="mica"`) against peft 0.21 on the tiny Llama and GPT-2.

With the same weights (moved through a peft folder either way): the same outputs (atol 1e-5), deltatune's
merged weights equal peft's `merge_and_unload`, and a backward pass gives gradients to exactly the tensors
peft trains, with peft's values (KaSA: A, B and the diagonal; MiCA: A only, B stays frozen). KaSA's
regularizer equals peft's `_get_kasa_loss`. KaSA runs on nn.Linear only (GPT-2's Conv1D is refused, as
peft refuses it); MiCA runs on Conv1D and embeddings too.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError, UnsupportedModuleError
from test_peft_crosscheck import assert_changed, assert_same
from tiny_models import ARCHS, build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VARIANTS = {
    "kasa": {"kasa_config": {"beta": 0.01, "gamma": 0.1}},
    "mica": {"init_lora_weights": "mica"},
}
CASES = [("kasa", "llama"), ("mica", "llama"), ("mica", "gpt2")]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"]}
"""MiCA's targets: linears (Conv1D on GPT-2) and the tiny Llama's untied embedding (GPT-2's is tied to its
head, which no merge takes); KaSA takes the linears (nn.Linear only)."""


def targets(variant: str, arch: str) -> list[str]:
    return [name for name in TARGETS[arch] if variant == "mica" or "embed" not in name]


def options(variant: str, arch: str) -> dict:
    return {"r": 4, "lora_alpha": 8, "target_modules": targets(variant, arch), **copy.deepcopy(VARIANTS[variant])}


def trained(model: torch.nn.Module) -> None:
    """Every trainable adapter tensor drawn anew (MiCA's A starts at zero, KaSA's B at zero): a trained adapter."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def peft_model(variant: str, arch: str, base: torch.nn.Module) -> peft.PeftModel:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options(variant, arch)))
    trained(model)
    return model.eval()


def our_model(variant: str, arch: str, base: torch.nn.Module) -> deltatune.DeltaModel:
    model = deltatune.attach(copy.deepcopy(base), deltatune.LoraConfig(**options(variant, arch)))
    trained(model)
    return model.eval()


PEFT_NAME = re.compile(r"base_model\.model\.(.+)\.(lora_\w+)\.default(?:\.weight)?$")


def gradients(model: torch.nn.Module, arch: str, ours: bool) -> dict[tuple[str, str], torch.Tensor]:
    """{(module, tensor): gradient} of one backward pass of the summed output, for the tensors that got one."""
    model.zero_grad()
    run(model, arch).square().mean().backward()
    found = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        if ours:
            module, tensor = name.removeprefix("base_model.").split(".deltatune.adapters.default.")
        else:
            module, tensor = PEFT_NAME.fullmatch(name).groups()
            tensor = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}.get(tensor, tensor)
        found[module, tensor] = parameter.grad
    return found


@pytest.mark.parametrize(("variant", "arch"), CASES)
def test_peft_folder_loads_here_with_peft_outputs(variant: str, arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_model(variant, arch, base)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = run(theirs, arch)
        assert_changed(expected, run(base, arch))
        assert_same(run(ours, arch), expected)


@pytest.mark.parametrize(("variant", "arch"), CASES)
def test_our_folder_loads_in_peft_with_our_outputs(variant: str, arch: str, tmp_path: Path) -> None:
    base = build(arch)
    ours = our_model(variant, arch, base)
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = run(ours, arch)
        assert_changed(expected, run(base, arch))
        assert_same(run(theirs, arch), expected)


@pytest.mark.parametrize(("variant", "arch"), CASES)
def test_merged_weights_equal_peft_merge_and_unload(variant: str, arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_model(variant, arch, base)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path))
    merged_ours = ours.unload(merge=True).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-5, rtol=0, msg=lambda message: f"{key}: {message}")
    assert any((merged_ours[key] - value).abs().max() > 1e-3 for key, value in base.state_dict().items())


@pytest.mark.parametrize(("variant", "arch"), CASES)
def test_gradients_reach_exactly_the_tensors_peft_trains_with_peft_values(
    variant: str, arch: str, tmp_path: Path
) -> None:
    base = build(arch)
    theirs = peft_model(variant, arch, base)
    theirs.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)
    expected, actual = gradients(theirs, arch, ours=False), gradients(ours, arch, ours=True)
    assert actual.keys() == expected.keys()
    kinds = {tensor for _, tensor in expected}
    assert kinds == ({"lora_A", "lora_B", "lora_diag"} if variant == "kasa" else {"lora_A"})
    for key, gradient in expected.items():
        torch.testing.assert_close(actual[key], gradient, atol=1e-5, rtol=1e-4, msg=lambda message: f"{key}: {message}")


def test_kasa_loss_equals_peft_regularizer(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft_model("kasa", "llama", base)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path))
    expected = theirs.base_model._get_kasa_loss()
    assert expected > 1e-3
    torch.testing.assert_close(deltatune.kasa_loss(ours), expected, atol=1e-6, rtol=1e-5)


def test_kasa_loss_has_no_terms_without_kasa_layers() -> None:
    plain = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    assert deltatune.kasa_loss(plain).item() == 0.0


def test_kasa_loss_trains_the_factors_towards_semi_orthogonal() -> None:
    ours = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"], kasa_config={}))
    ours.zero_grad()
    deltatune.kasa_loss(ours).backward()
    assert all(parameter.grad is not None for parameter in ours.parameters() if parameter.requires_grad)


def test_kasa_starts_at_the_truncated_base_and_unloads_to_the_original() -> None:
    """y = (W − D) x at the start (B = 0), D the r smallest singular components; unload gives W back."""
    base = build("llama")
    config = deltatune.LoraConfig(r=12, target_modules=["q_proj", "v_proj", "down_proj"], kasa_config={})
    ours = deltatune.attach(copy.deepcopy(base), config)
    truncated = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in truncated.named_modules():
            if name.endswith(("q_proj", "v_proj", "down_proj")):
                left, values, right_t = torch.linalg.svd(module.weight, full_matrices=False)
                kept = min(module.weight.shape) - 12
                module.weight.copy_((left[:, :kept] * values[:kept]) @ right_t[:kept])
        expected = run(truncated, "llama")
        assert_changed(expected, run(base, "llama"))
        assert_same(run(ours.eval(), "llama"), expected)
        restored = ours.unload(merge=False)
        assert all(torch.equal(restored.state_dict()[key], value) for key, value in base.state_dict().items())


def test_kasa_on_gpt2_conv1d_is_refused_as_peft_refuses_it() -> None:
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        peft.get_peft_model(build("gpt2"), peft.LoraConfig(target_modules=["c_attn"], kasa_config={}))
    with pytest.raises(UnsupportedModuleError, match=r"kasa_config runs on nn.Linear layers only.*c_attn"):
        deltatune.attach(build("gpt2"), deltatune.LoraConfig(target_modules=["c_attn"], kasa_config={}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kasa_config": {}, "r": 16}, r"KaSA needs r below min\(out, in\) = 16 at .*v_proj"),
        ({"init_lora_weights": "mica", "r": 17}, r"'mica' needs r ≤ min\(out, in\) = 16 at .*v_proj"),
        ({"kasa_config": {}, "use_dora": True}, "kasa_config does not combine with use_dora"),
        ({"kasa_config": {}, "init_lora_weights": "pissa"}, "kasa_config does not combine"),
        ({"kasa_config": {"beta": -1.0}}, "kasa_config.beta must be a number ≥ 0"),
    ],
)
def test_bad_kasa_and_mica_settings_are_refused_in_one_sentence(config: dict, message: str) -> None:
    with pytest.raises(DeltaTuneError, match=message):
        deltatune.attach(build("llama"), deltatune.LoraConfig(target_modules=["v_proj"], **config))


def test_mica_b_is_frozen_minor_directions_and_a_starts_at_zero() -> None:
    """B = the r left singular vectors of W with the smallest singular values, not a parameter; A = 0."""
    base = build("llama")
    ours = deltatune.attach(
        copy.deepcopy(base), deltatune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica")
    )
    adapters = [site.adapters["default"] for _, site in ours.sites()]
    weights = [module.weight for name, module in base.named_modules() if name.endswith("q_proj")]
    assert len(adapters) == len(weights) == ARCHS["llama"].build().config.num_hidden_layers
    for adapter, weight in zip(adapters, weights, strict=True):
        left, _, _ = torch.linalg.svd(weight.detach(), full_matrices=False)
        assert torch.equal(adapter.lora_B, left[:, -4:])
        assert "lora_B" not in dict(adapter.named_parameters()) and not adapter.lora_A.any()


def test_kasa_converts_to_a_plain_lora_that_peft_loads_on_the_original_base(tmp_path: Path) -> None:
    """A' = [diag(ΔΣ) A; A₀], B' = [B, −B₀/s]: a plain rank-2r LoRA, the same function (peft has no such conversion)."""
    base = build("llama")
    ours = our_model("kasa", "llama", base)
    with torch.no_grad():
        expected = run(ours, "llama")
    deltatune.to_plain_lora(ours, "default", "plain")
    ours.save(str(tmp_path), ["plain"], format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "kasa_config" not in config and config["r"] == 8  # no KaSA left: the key is not written
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_same(run(theirs, "llama"), expected)


def test_deltatune_train_adds_kasa_regularizer_as_the_paper_trains() -> None:
    """peft leaves `_get_kasa_loss` to the user's loop; the paper trains with it, so `deltatune train` adds it
    (a step hook) for KaSA adapters, with each adapter's own β and γ, and for no other LoRA adapter."""
    from deltatune.train.step_hooks import extra_loss, step_hooks

    ours = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"], **VARIANTS["kasa"]))
    ours.add("plain", deltatune.LoraConfig(r=4, target_modules=["v_proj"]))
    trained(ours)
    hooks = step_hooks(ours, total_steps=4)
    assert list(hooks) == ["default"]
    expected = deltatune.kasa_loss(ours, "default")
    assert expected > 1e-3
    assert torch.equal(extra_loss(hooks), expected)
