"""LoRA on convolutions beyond the plain case: Conv3d, strides, dilations and non-zero padding modes
against torch's own convolution with W + ΔW written in (the merged layer); grouped convolutions refuse
what peft refuses, in one sentence, leaving the weights as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, MergeError, UnsupportedModuleError
from test_peft_crosscheck import assert_changed, assert_same

pytestmark = pytest.mark.transformers_independent  # torch's convolutions, no transformers model

LAYERS = {
    "conv1d-dilated-reflect": (nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"), (2, 3, 11)),
    "conv2d-strided-circular": (nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1, padding_mode="circular"), (2, 3, 7, 6)),
    "conv3d-replicate": (nn.Conv3d(2, 4, (3, 1, 3), padding=(1, 0, 1), padding_mode="replicate"), (2, 2, 4, 5, 5)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_lora_conv_equals_torch_convolution_with_the_merged_weight(layer: str) -> None:
    torch.manual_seed(0)
    conv, shape = LAYERS[layer]
    base = nn.Sequential(copy.deepcopy(conv)).eval()
    ours = deltatune.attach(base, deltatune.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        unmerged = ours(x)
        assert_changed(unmerged, conv(x))
        ours.merge()
        merged = base[0]._conv_forward(x, base[0].weight, base[0].bias)  # torch's conv, adapter-free
    assert_same(unmerged, merged)


def grouped_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 3, groups=4))


def test_lora_on_a_grouped_conv_needs_a_rank_divisible_by_the_groups() -> None:
    base = grouped_model()
    with pytest.raises(UnsupportedModuleError, match="rank divisible by 4, not 6") as raised:
        deltatune.attach(base, deltatune.LoraConfig(r=6, target_modules=["0"]))
    assert "\n" not in str(raised.value)
    assert not any(name.endswith("deltatune") for name, _ in base.named_modules())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merging_lora_on_a_grouped_conv_is_refused_and_changes_nothing(use_dora: bool) -> None:
    base = grouped_model()
    ours = deltatune.attach(
        base, deltatune.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)
    ).eval()
    weight = base[0].weight.detach().clone()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = ours(x)
        with pytest.raises(MergeError, match="grouped convolution") as raised:
            ours.merge()
        assert "\n" not in str(raised.value)
        assert torch.equal(base[0].weight, weight)
        assert torch.equal(ours(x), expected)


def test_add_weighted_adapter_refuses_lora_on_a_grouped_conv_in_one_sentence() -> None:
    ours = deltatune.attach(grouped_model(), deltatune.LoraConfig(r=4, target_modules=["0"]), name="a")
    with pytest.raises(DeltaTuneError, match="cannot combine a: LoRA on bare parameters") as raised:
        ours.add_weighted_adapter(["a"], [1.0], "combined")
    assert "\n" not in str(raised.value) and "combined" not in ours.configs
