"""DoRA on Embedding and Conv layers: the norm against torch's norm of the materialised weight along
peft's axes, and against peft with the same weights: gradients of A, B and m, and outputs under dropout
with the same seed. (Outputs, merges and folders of these layers: test_peft_custom_model_cases.py.)"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from test_peft_crosscheck import assert_same, assert_same_parameter
from test_peft_custom_model_cases import CASES, base_model, inputs, peft_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYERS = {
    "emb": "Embedding + transformers Conv1D 2 DoRA",
    "conv1d": "Conv1d LoRA with DoRA",
    "conv2d": "Conv2d 1 LoRA with DoRA",
    "conv3d": "Conv3d 1 LoRA with DoRA",
}


def loaded(name: str, tmp_path: Path) -> tuple[peft.PeftModel, deltatune.DeltaModel, torch.Tensor]:
    row = CASES[name]
    base = base_model(row)
    theirs = peft_model(row, base)
    theirs.save_pretrained(tmp_path)
    return theirs, deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True), inputs(row)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_dora_norm_of_embeddings_and_convs_equals_the_norm_of_the_materialised_weight(layer: str, tmp_path) -> None:
    _, ours, _ = loaded(LAYERS[layer], tmp_path)
    module = ours.base_model.get_submodule(layer)
    adapter = dict(ours.sites())[layer].adapters["default"]
    lora_A, lora_B = adapter.lora_A.detach(), adapter.lora_B.detach()
    if layer == "emb":  # peft's axis: per embedding dimension, over the vocabulary
        combined = module.weight.detach() + adapter.scaling * (lora_B @ lora_A).t()
        expected = torch.linalg.norm(combined, dim=0)
    else:  # per output channel, over input channels and kernel
        update = (lora_B.flatten(1) @ lora_A.flatten(1)).view(module.weight.shape)
        expected = torch.linalg.norm((module.weight.detach() + adapter.scaling * update).flatten(1), dim=1)
    torch.testing.assert_close(adapter.weight_norm(module), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_dora_gradients_on_embeddings_and_convs_match_peft(layer: str, tmp_path: Path) -> None:
    theirs, ours, x = loaded(LAYERS[layer], tmp_path)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    peft_layer = theirs.base_model.model.get_submodule(layer)
    adapter = dict(ours.sites())[layer].adapters["default"]
    first, second = ("lora_embedding_A", "lora_embedding_B") if layer == "emb" else ("lora_A", "lora_B")
    reference = {
        "lora_A": getattr(peft_layer, first)["default"],
        "lora_B": getattr(peft_layer, second)["default"],
        "lora_magnitude_vector": peft_layer.lora_magnitude_vector["default"].weight,
    }
    for name, tensor in reference.items():
        tensor = tensor if isinstance(tensor, torch.nn.Parameter) else tensor.weight
        assert_same_parameter(getattr(adapter, name).grad, tensor.grad, f"{layer}.{name}")


@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "conv3d"])
def test_dora_conv_with_dropout_matches_peft_under_the_same_seed(layer: str, tmp_path: Path) -> None:
    row = CASES[LAYERS[layer]]
    base = base_model(row)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**row.options, init_lora_weights=False, lora_dropout=0.4)
    )
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)
    theirs.train()
    ours.train()
    x = inputs(row)
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    assert_same(ours(x), expected)
