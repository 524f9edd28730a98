"""LoRA on `nn.MultiheadAttention` against torch's own attention with the adapted weights written in:
batched and unbatched, with and without autograd (without it and batched, torch takes its fused path);
training reaches the factors only; the weights are the model's own parameters again after every call;
what peft refuses is refused here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, UnsupportedModuleError
from deltatune.methods.lora_mha import OUT_PROJ_REPEATS
from test_peft_crosscheck import assert_changed, assert_same

pytestmark = pytest.mark.transformers_independent  # torch's own attention, no transformers model


class Attention(nn.Module):
    def __init__(self, batch_first: bool = True, **options) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options)
        self.lin0 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


def adapted(**options) -> tuple[nn.Module, deltatune.DeltaModel]:
    torch.manual_seed(0)
    base = Attention(**options).eval()
    ours = deltatune.attach(
        copy.deepcopy(base), deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"], init_lora_weights=False)
    )
    return base, ours.eval()


def written_in(base: nn.Module, ours: deltatune.DeltaModel) -> nn.Module:
    """The base with W + s·B A in its in-projection and W + 2·s·B A in its out-projection (peft's rule)."""
    reference = copy.deepcopy(base)
    factors = dict(ours.sites())["mha"].adapters["default"].factors
    with torch.no_grad():
        for key, parameter in (("in_proj", reference.mha.in_proj_weight), ("out_proj", reference.mha.out_proj.weight)):
            lora_A, lora_B = factors[key].lora_A, factors[key].lora_B
            repeats = OUT_PROJ_REPEATS if key == "out_proj" else 1
            parameter += repeats * 2.0 * lora_B @ lora_A  # s = lora_alpha / r = 2
    return reference


@pytest.mark.parametrize("shape", [(2, 5, 16), (5, 16)], ids=["batched", "unbatched"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_lora_mha_equals_torch_attention_with_the_adapted_weights(shape, grad: bool) -> None:
    base, ours = adapted()
    x = torch.randn(*shape)
    with torch.set_grad_enabled(grad):
        expected = written_in(base, ours)(x)
        assert_changed(expected, base(x))
        assert_same(ours(x), expected)


def test_lora_mha_trains_only_its_factors_and_leaves_the_weights_in_place() -> None:
    base, ours = adapted()
    ours.train()
    weights = {name: parameter for name, parameter in ours.base_model.named_parameters() if "deltatune" not in name}
    before = {name: parameter.detach().clone() for name, parameter in weights.items()}
    loss = ours(torch.randn(2, 5, 16)).square().mean()
    loss.backward()
    trained = [name for name, parameter in ours.named_parameters() if parameter.grad is not None]
    assert trained and all("factors" in name for name in trained)
    assert all(ours.base_model.get_parameter(name) is parameter for name, parameter in weights.items())
    assert all(torch.equal(weights[name], value) for name, value in before.items())


def test_lora_mha_merge_equals_unmerged_and_unmerge_restores_the_weights() -> None:
    base, ours = adapted()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge()
        assert_same(ours(x), unmerged)
        ours.unmerge()
        for name, parameter in base.named_parameters():
            assert_same(ours.base_model.get_parameter(name), parameter)


@pytest.mark.parametrize(
    ("options", "config", "match"),
    [
        ({"kdim": 8, "vdim": 8}, {}, "separate query, key and value"),
        ({}, {"use_dora": True}, "use_dora is not supported on MultiheadAttention"),
    ],
)
def test_what_peft_refuses_on_mha_is_refused_in_one_sentence(options, config, match) -> None:
    base = Attention(**options)
    with pytest.raises(UnsupportedModuleError, match=match) as raised:
        deltatune.attach(base, deltatune.LoraConfig(target_modules=["mha"], **config))
    assert "\n" not in str(raised.value)


def test_a_mixed_batch_through_lora_mha_is_refused() -> None:
    _, ours = adapted()
    with pytest.raises(DeltaTuneError, match="mixed batches"):
        ours(torch.randn(2, 5, 16), adapter_names=["default", None])


def test_lora_mha_saves_loads_disables_and_unloads_to_the_base(tmp_path) -> None:
    base, ours = adapted()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = ours(x)
        ours.save(str(tmp_path / "adapter"))
        assert_same(deltatune.load(copy.deepcopy(base), str(tmp_path / "adapter")).eval()(x), expected)
        with ours.disabled():
            assert torch.equal(ours(x), base(x))
        plain = ours.unload(merge=False)
        assert torch.equal(plain(x), base(x))
        assert plain.state_dict().keys() == base.state_dict().keys()
