"""LoRA on bare parameters (`target_parameters`) against peft's `ParamWrapper`: transformers 5's fused
mixture-of-experts weights (a tiny Qwen3-MoE, whose experts hold 3-D `gate_up_proj` and `down_proj` as
experts × out × in, and a tiny GPT-OSS, whose experts are `is_transposed`: experts × in × out), with
the same weights both ways through peft folders; merging; the parameter is back after every call, one
that raised included; training reaches A and B only."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, TargetNotFoundError, UnsupportedModuleError
from test_peft_crosscheck import assert_changed, assert_same
from test_quantized import needs_bitsandbytes
from tiny_models import build

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(kind: str | None = None) -> nn.Module:
    """A two-layer mixture-of-experts model of `kind` with four fused experts, built from a config; without
    a kind, the first of `MOE_BUILDERS` whose experts this transformers fuses."""
    if kind is not None:
        return MOE_BUILDERS[kind]()
    for builder in MOE_BUILDERS.values():
        try:
            return builder()
        except pytest.skip.Exception:
            continue
    pytest.skip("this transformers fuses the experts of none of these models")


def _fused_experts(model: nn.Module) -> nn.Module:
    experts = model.model.layers[0].mlp.experts
    if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) or experts.gate_up_proj.dim() != 3:
        pytest.skip(f"this transformers keeps {type(model).__name__}'s experts as separate Linear layers")
    return model


def _qwen3_moe() -> nn.Module:
    if not hasattr(transformers, "Qwen3MoeConfig"):
        pytest.skip("this transformers has no Qwen3-MoE")
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return _fused_experts(transformers.Qwen3MoeForCausalLM(config).eval())


def _gpt_oss() -> nn.Module:
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no GPT-OSS")
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    )
    torch.manual_seed(0)
    return _fused_experts(transformers.GptOssForCausalLM(config).eval())


MOE_BUILDERS = {"qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss}


IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 60, 21, 4]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", list(MOE_BUILDERS))
def test_peft_folder_with_fused_expert_parameters_loads_here_with_peft_outputs(kind: str, tmp_path: Path) -> None:
    base = tiny_moe(kind)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    expected = logits(theirs)
    assert_changed(expected, logits(base))
    assert_same(logits(ours), expected)


@pytest.mark.parametrize("kind", list(MOE_BUILDERS))
def test_our_fused_expert_adapter_loads_in_peft_with_our_outputs_and_merges(kind: str, tmp_path: Path) -> None:
    base = tiny_moe(kind)
    config = deltatune.LoraConfig(r=2, lora_alpha=6, target_parameters=TARGETS, init_lora_weights=False)
    ours = deltatune.attach(copy.deepcopy(base), config).eval()
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    expected = logits(ours)
    assert_changed(expected, logits(base))
    assert_same(logits(theirs), expected)
    ours.merge()
    assert_same(logits(ours), expected)
    ours.unmerge()
    for name, original in base.named_parameters():
        assert_same(ours.base_model.get_parameter(name), original)


def test_per_parameter_ranks_and_alphas_carry_over_to_peft(tmp_path: Path) -> None:
    base = tiny_moe()
    config = deltatune.LoraConfig(
        r=2,
        target_parameters=TARGETS,
        rank_pattern={"down_proj": 3},
        alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 5},
        init_lora_weights=False,
    )
    ours = deltatune.attach(copy.deepcopy(base), config).eval()
    factors = dict(ours.sites())["model.layers.0.mlp.experts"].adapters["default"].factors
    assert factors["down_proj"].lora_A.shape[0] == 3 * 4 and factors["gate_up_proj"].lora_A.shape[0] == 2 * 4
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(logits(theirs), logits(ours))


def test_the_parameter_is_the_same_object_after_a_call_even_one_that_raised() -> None:
    base = tiny_moe()
    experts = base.model.layers[0].mlp.experts
    parameter = experts.gate_up_proj
    ours = deltatune.attach(base, deltatune.LoraConfig(r=2, target_parameters=TARGETS, init_lora_weights=False))
    logits(ours)
    assert experts.gate_up_proj is parameter
    with pytest.raises(Exception):  # noqa: B017 (whatever the model raises on a token past its vocabulary)
        ours(input_ids=torch.tensor([[1000]]))
    assert experts.gate_up_proj is parameter and experts._parameters["gate_up_proj"] is parameter


def test_training_changes_only_the_factors_and_lowers_the_loss() -> None:
    base = tiny_moe()
    ours = deltatune.attach(base, deltatune.LoraConfig(r=2, target_parameters=TARGETS)).train()
    trainable = [parameter for parameter in ours.parameters() if parameter.requires_grad]
    assert trainable and all(parameter.dim() == 2 for parameter in trainable)
    frozen = {
        name: parameter.detach().clone() for name, parameter in base.named_parameters() if "deltatune" not in name
    }
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = ours(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(base.get_parameter(name), value) for name, value in frozen.items())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"target_parameters": ["mlp.experts.no_such"]}, TargetNotFoundError, "match no parameter"),
        ({"target_parameters": TARGETS, "lora_dropout": 0.1}, UnsupportedModuleError, "lora_dropout"),
        ({"target_parameters": TARGETS, "use_dora": True}, UnsupportedModuleError, "use_dora"),
        ({"target_parameters": ["model.norm.weight"]}, UnsupportedModuleError, "1-D parameter"),
    ],
)
def test_target_parameters_that_cannot_be_adapted_are_refused_in_one_sentence(options, error, match) -> None:
    base = tiny_moe()
    with pytest.raises(error, match=match) as raised:
        deltatune.attach(base, deltatune.LoraConfig(r=2, **options))
    assert "\n" not in str(raised.value)
    assert not any("deltatune" in name for name, _ in base.named_modules())


def test_a_mixed_batch_over_adapted_parameters_is_refused() -> None:
    ours = deltatune.attach(tiny_moe(), deltatune.LoraConfig(r=2, target_parameters=TARGETS), name="a")
    with pytest.raises(DeltaTuneError, match="mixed batches"):
        ours(input_ids=IDS, adapter_names=["a", None])


def test_add_weighted_adapter_refuses_lora_on_parameters_in_one_sentence() -> None:
    ours = deltatune.attach(tiny_moe(), deltatune.LoraConfig(r=2, target_parameters=TARGETS), name="a")
    with pytest.raises(DeltaTuneError, match="cannot combine a: LoRA on bare parameters") as raised:
        ours.add_weighted_adapter(["a"], [1.0], "combined")
    assert "\n" not in str(raised.value) and "combined" not in ours.configs


@needs_bitsandbytes
def test_target_parameters_on_a_quantized_weight_is_refused_naming_it() -> None:
    base = build("llama-nf4")
    with pytest.raises(UnsupportedModuleError, match=r"q_proj.weight, a quantized weight") as raised:
        deltatune.attach(base, deltatune.LoraConfig(target_parameters=["layers.0.self_attn.q_proj.weight"]))
    assert "\n" not in str(raised.value)
