"""LoRA on parts of a fused projection's output (`fused_slices`: GPT-2's `c_attn` computes q, k and v as
three parts of one output), against the plain computation: each enabled part g adds s · x A_gᵀ B_gᵀ to its
own output features, the other parts are left as the base computes them; gated, part g's term is multiplied
by its own gate mean_t σ(W_g[g] x_t + b_g[g]) instead of s."""

from __future__ import annotations

import pytest
import torch

import deltatune
from tiny_models import ARCHS, build

QUERY_AND_VALUE = {"c_attn": [True, False, True]}


def randomized(config: deltatune.LoraConfig, arch: str = "gpt2") -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build(arch), config, name="task")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("task"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return delta_model


def plain_terms(x: torch.Tensor, layer, enabled: list[bool], out_features: int) -> torch.Tensor:
    """The LoRA terms of every part, unscaled, laid out over the layer's whole output (zero where disabled)."""
    part = out_features // len(enabled)
    rank = layer.lora_B.shape[1]
    terms = torch.zeros(*x.shape[:-1], out_features)
    for group, index in enumerate(index for index, on in enumerate(enabled) if on):
        down = layer.lora_A[group * rank : (group + 1) * rank]
        up = layer.lora_B[group * part : (group + 1) * part]
        terms[..., index * part : (index + 1) * part] = x @ down.t() @ up.t()
    return terms


def reference_logits(
    delta_model: deltatune.DeltaModel, term, arch: str = "gpt2", layer: str = "c_attn"
) -> torch.Tensor:
    """The base model's logits with `term(name, x)` added to every `layer` output by a hook of the test's own."""
    base = build(arch)
    handles = [
        module.register_forward_hook(lambda _module, args, output, name=name: output + term(name, args[0]))
        for name, module in base.named_modules()
        if name.endswith(layer)
    ]
    try:
        with torch.no_grad():
            return base(**ARCHS[arch].inputs(1)).logits
    finally:
        for handle in handles:
            handle.remove()


def adapters_by_module(delta_model: deltatune.DeltaModel) -> dict[str, torch.nn.Module]:
    return {name: site.adapters["task"] for name, site in delta_model.sites()}


@pytest.mark.parametrize("enabled", [[True, False, True], [False, True, False], [True, True, True]])
def test_fused_slice_lora_adds_each_enabled_part_to_its_own_output_features(enabled: list[bool]) -> None:
    delta_model = randomized(deltatune.LoraConfig(r=2, lora_alpha=6, fused_slices={"c_attn": enabled}))
    layers = adapters_by_module(delta_model)
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    layer = layers["transformer.h.0.attn.c_attn"]
    assert layer.lora_A.shape == (2 * sum(enabled), 32) and layer.lora_B.shape == (32 * sum(enabled), 2)

    expected = reference_logits(delta_model, lambda name, x: 3.0 * plain_terms(x, layers[name], enabled, 96))
    with torch.no_grad():
        torch.testing.assert_close(delta_model(**ARCHS["gpt2"].inputs(1)).logits, expected, atol=1e-5, rtol=0)


def test_fused_slice_lora_merges_into_the_enabled_parts_only() -> None:
    delta_model = randomized(deltatune.LoraConfig(r=2, fused_slices=QUERY_AND_VALUE))
    weight = delta_model.base_model.get_submodule("transformer.h.0.attn.c_attn").weight
    before = weight.detach().clone()
    delta_model.merge(["task"])
    key_columns = slice(32, 64)  # Conv1D keeps in × out: the key part is the middle third of the columns
    assert torch.equal(weight[:, key_columns], before[:, key_columns])
    assert not torch.allclose(weight[:, :32], before[:, :32]) and not torch.allclose(weight[:, 64:], before[:, 64:])


def test_gated_fused_slice_lora_gates_each_part_with_its_own_head() -> None:
    delta_model = randomized(deltatune.LoraConfig(r=2, use_gating=True, fused_slices=QUERY_AND_VALUE))
    layers = adapters_by_module(delta_model)
    assert layers["transformer.h.0.attn.c_attn"].gate.weight.shape == (2, 32)

    def gated(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = layers[name]
        gates = torch.sigmoid(x @ layer.gate.weight.t() + layer.gate.bias).mean(dim=1, keepdim=True)
        per_feature = torch.cat(
            [gates[..., :1].expand(-1, -1, 32), torch.ones(3, 1, 32), gates[..., 1:].expand(-1, -1, 32)], -1
        )
        return plain_terms(x, layer, [True, False, True], 96) * per_feature

    expected = reference_logits(delta_model, gated)
    with torch.no_grad():
        torch.testing.assert_close(delta_model(**ARCHS["gpt2"].inputs(1)).logits, expected, atol=1e-5, rtol=0)


def test_fused_slice_lora_on_a_quantized_base_adds_its_part_to_the_layer_output() -> None:
    """nf4 q_proj layers (bitsandbytes): float32 factors from the logical shape, the second half adapted."""
    pytest.importorskip("bitsandbytes")
    config = deltatune.LoraConfig(r=2, target_modules=["q_proj"], fused_slices={"q_proj": [False, True]})
    delta_model = randomized(config, "llama-nf4")
    layers = adapters_by_module(delta_model)
    assert all(layer.lora_A.dtype == torch.float32 and layer.lora_B.shape == (32, 2) for layer in layers.values())

    expected = reference_logits(
        delta_model, lambda name, x: 4.0 * plain_terms(x, layers[name], [False, True], 64), "llama-nf4", "q_proj"
    )
    with torch.no_grad():
        actual = delta_model(**ARCHS["llama-nf4"].inputs(1)).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ({"c_attn": [True, False, True, False, True]}, "96 output features.*5 equal parts"),
        ({"c_attn": [False, False, False]}, "enables no part"),
        ({"c_attn": []}, "enables no part"),
    ],
)
def test_fused_slices_that_do_not_fit_the_layer_are_refused(slices: dict, message: str) -> None:
    model = build("gpt2")
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.attach(model, deltatune.LoraConfig(r=2, fused_slices=slices), name="task")
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]


@pytest.mark.parametrize(
    "option", [{"use_dora": True}, {"lora_bias": True}, {"bias": "all"}, {"init_lora_weights": "pissa"}]
)
def test_fused_slices_refuse_options_that_change_the_layer(option: dict) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="fused_slices"):
        deltatune.LoraConfig(r=2, fused_slices=QUERY_AND_VALUE, **option)


def test_a_fused_slice_lora_is_refused_in_peft_format(tmp_path) -> None:
    delta_model = randomized(deltatune.LoraConfig(r=2, fused_slices=QUERY_AND_VALUE))
    with pytest.raises(deltatune.DeltaTuneError, match="fused_slices"):
        delta_model.save(tmp_path / "task", format="peft")
    assert not (tmp_path / "task").exists()


def test_add_weighted_adapter_refuses_a_fused_slice_lora_and_adds_nothing() -> None:
    """Its stacked factors are not one layer's A and B, so peft's combinations would mix the parts up."""
    delta_model = randomized(deltatune.LoraConfig(r=2, fused_slices=QUERY_AND_VALUE))
    delta_model.add("other", deltatune.LoraConfig(r=2, fused_slices=QUERY_AND_VALUE))
    with pytest.raises(deltatune.DeltaTuneError, match="fused_slices"):
        delta_model.add_weighted_adapter(["task", "other"], [0.5, 0.5], "combined")
    assert "combined" not in delta_model.configs
