"""Merging is all or nothing: a merge that is refused leaves every base weight bit-identical.

The refusal comes from the last adapted module, so every module before it was already checked (and,
in a merge that writes as it goes, already written) when the refusal comes.
"""

from __future__ import annotations

import pytest
import torch

import deltatune
from test_custom_method import ScaledOutputConfig
from test_invariants import attached, base_state
from tiny_models import build, run


def break_last_site(delta_model: deltatune.DeltaModel, name: str = "default") -> None:
    """Put an infinity into every parameter of adapter `name` at the last adapted module."""
    _, site = list(delta_model.sites())[-1]
    with torch.no_grad():
        for parameter in site.adapters[name].parameters():
            parameter.view(-1)[0] = float("inf")


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_refused_merge_leaves_every_base_weight_bit_identical(method: str) -> None:
    """LoRA on every linear layer; BitFit with `add_missing_bias` on Llama, whose layers get new biases."""
    delta_model = attached(method, "llama")
    break_last_site(delta_model)
    before = base_state(delta_model.base_model)
    with pytest.raises(deltatune.MergeError, match="non-finite"):
        delta_model.merge()
    after = base_state(delta_model.base_model)
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, f"a refused merge changed {len(changed)} base tensors, first {changed[0]}"
    assert not any(site.merged or site.created_parameters for _, site in delta_model.sites())


def test_refused_unload_keeps_the_model_and_its_adapters() -> None:
    delta_model = attached("lora", "llama")
    break_last_site(delta_model)
    before = base_state(delta_model.base_model)
    with pytest.raises(deltatune.MergeError):
        delta_model.unload(merge=True)
    assert list(delta_model.configs) == ["default"]
    after = base_state(delta_model.base_model)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_merge_checks_values_after_the_cast_to_the_weight_dtype() -> None:
    """In float16, W + ΔW = 60000 + 10000 is finite in float32 but infinite once cast back."""
    delta_model = deltatune.attach(
        build("mlp").half(), deltatune.LoraConfig(r=1, lora_alpha=1, target_modules=["net.0", "net.2"])
    )
    layer = delta_model.base_model.net[2]
    adapter = layer.deltatune.adapters["default"]
    with torch.no_grad():
        layer.weight[0, 0] = 60000.0
        adapter.lora_A.zero_()[0, 0] = 100.0
        adapter.lora_B.zero_()[0, 0] = 100.0
    inputs = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).half()
    expected = delta_model(inputs)
    before = base_state(delta_model.base_model)
    with pytest.raises(deltatune.MergeError, match="non-finite values in weight"):
        delta_model.merge()
    assert all(torch.equal(before[key], value) for key, value in base_state(delta_model.base_model).items())
    delta_model.unmerge()  # nothing is merged: a no-op, not an error
    assert torch.equal(delta_model(inputs), expected)


def test_check_sees_what_earlier_adapters_at_a_module_write() -> None:
    """A delta that reads the weights (`scaled_output`: ΔW = W ⊙ γ) after a LoRA at the same module is
    computed from W + ΔW_lora: 30001 · (1 + 2) overflows float16, which W · 2 alone would not show."""
    delta_model = deltatune.attach(
        build("mlp").half(), deltatune.LoraConfig(r=1, lora_alpha=1, target_modules=["net.2"]), name="lora"
    )
    delta_model.add("scale", ScaledOutputConfig(target_modules=["net.2"]))
    layer = delta_model.base_model.net[2]
    lora, scale = layer.deltatune.adapters["lora"], layer.deltatune.adapters["scale"]
    with torch.no_grad():
        layer.weight[0, 0] = 1.0
        lora.lora_A.zero_()[0, 0] = 100.0
        lora.lora_B.zero_()[0, 0] = 300.0
        scale.gamma.zero_()[0] = 2.0
    before = base_state(delta_model.base_model)
    with pytest.raises(deltatune.MergeError, match="adapter 'scale' at net.2 gives non-finite values in weight"):
        delta_model.merge(["lora", "scale"])
    assert all(torch.equal(before[key], value) for key, value in base_state(delta_model.base_model).items())


def test_merge_that_fails_while_writing_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the write pass fail after every value was checked (out of memory, an interrupt), the module
    it was writing is restored bit-exactly and those written before it are unmerged again."""
    delta_model = attached("lora", "llama")
    before = base_state(delta_model.base_model)
    last_name, site = list(delta_model.sites())[-1]
    adapter = site.adapters["default"]
    computed = adapter.delta_parameters
    calls: list[int] = []

    def fails_in_the_write_pass(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return computed(module)

    monkeypatch.setattr(adapter, "delta_parameters", fails_in_the_write_pass)
    with pytest.raises(MemoryError):
        delta_model.merge()
    assert not any(site.merged for _, site in delta_model.sites())
    after = base_state(delta_model.base_model)
    assert torch.equal(after[f"{last_name}.weight"], before[f"{last_name}.weight"])
    for key, value in after.items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_merge_then_unmerge_restores_the_weights_within_rounding() -> None:
    """A successful merge is undone by subtraction: within a few float32 rounding steps, not bit-exact."""
    delta_model = attached("lora", "llama")
    before = base_state(delta_model.base_model)
    expected = run(delta_model, "llama")
    delta_model.merge()
    delta_model.unmerge()
    for key, value in base_state(delta_model.base_model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=1e-5, rtol=0)
