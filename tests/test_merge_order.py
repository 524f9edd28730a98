"""Merging folds each layer's adapters in the order the forward composes them: the output-side deltas
(LoRA, an output scale) in activation order, then the adapters that rewrite the layer's input (IA3's
feed-forward scale, OFT's rotation) in the reverse of the order their pre-hooks ran. With y = W (P₂ P₁ x)
+ s·BA (P₂ P₁ x), the merged weight is (W + s·BA) P₂ P₁: any other order gives another function."""

from __future__ import annotations

import pytest
import torch

import deltatune
from test_invariants import randomize
from tiny_models import build, run

INPUT_REWRITERS = {
    "ia3": lambda: deltatune.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
    "oft": lambda: deltatune.OFTConfig(target_modules=["down_proj"], r=0, oft_block_size=8),
}
ADAPTERS = {**INPUT_REWRITERS, "lora": lambda: deltatune.LoraConfig(r=4, target_modules=["down_proj"])}
PAIRS = [("ia3", "lora"), ("oft", "lora"), ("ia3", "oft")]


def two_adapters(first: str, second: str) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build("llama"), ADAPTERS[first](), name=first)
    delta_model.add(second, ADAPTERS[second]())
    for seed, name in enumerate((first, second)):
        randomize(delta_model, name, seed=seed)
    return delta_model.eval()


@pytest.mark.parametrize("order", ["as added", "reversed"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: "+".join(pair))
def test_merge_of_an_input_rewriter_beside_another_adapter_equals_the_unmerged_forward(pair, order) -> None:
    names = list(pair) if order == "as added" else list(pair[::-1])
    delta_model = two_adapters(*pair)
    delta_model.activate(*names)
    expected = run(delta_model, "llama")
    delta_model.merge(names)
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=1e-5, rtol=0)
    delta_model.unmerge()
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: "+".join(pair))
def test_unload_with_merge_of_an_input_rewriter_beside_another_adapter_keeps_the_outputs(pair) -> None:
    delta_model = two_adapters(*pair)
    delta_model.activate(*pair)
    expected = run(delta_model, "llama")
    torch.testing.assert_close(run(delta_model.unload(merge=True), "llama"), expected, atol=1e-5, rtol=0)
