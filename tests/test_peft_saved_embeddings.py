"""peft's `save_embedding_layers` puts the model's whole embedding weights into the adapter file
(`embed_tokens.base_layer.weight` when LoRA adapts the embedding, `embed_tokens.weight` and
`lm_head.weight` else), and peft writes them into the base model when it loads. deltatune never rewrites
the base: a copy equal to the model's weights loads (with peft's outputs), a copy that differs is
refused with an error naming the key, never dropped in silence."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
SETUPS = {
    "adapted-embedding": (["embed_tokens", "q_proj"], "model.embed_tokens.base_layer.weight"),
    "plain-embedding": (["q_proj", "v_proj"], "model.embed_tokens.weight"),
}


def peft_folder_with_embeddings(
    folder: Path, targets: list[str], change_embeddings: bool
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A peft adapter saved with save_embedding_layers=True; with `change_embeddings` the embedding
    weights were trained (they differ from the base model's). The base, and peft's output after loading."""
    base = build("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False)
    )
    if change_embeddings:
        with torch.no_grad():
            theirs.get_input_embeddings().weight.add_(0.05 * torch.randn_like(theirs.get_input_embeddings().weight))
    theirs.save_pretrained(str(folder), save_embedding_layers=True)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    return base, run(loaded, "llama")


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_saved_embedding_weights_equal_to_the_model_load_with_peft_outputs(setup: str, tmp_path: Path) -> None:
    targets, _ = SETUPS[setup]
    base, expected = peft_folder_with_embeddings(tmp_path, targets, change_embeddings=False)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(ours, "llama"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_saved_embedding_weights_that_differ_from_the_model_are_refused_by_key(setup: str, tmp_path: Path) -> None:
    targets, key = SETUPS[setup]
    base, expected = peft_folder_with_embeddings(tmp_path, targets, change_embeddings=True)
    assert (expected - run(base, "llama")).abs().max() > 1e-3
    model = copy.deepcopy(base)
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    with pytest.raises(
        deltatune.DeltaTuneError, match=rf"'base_model.model.{key}'.*save_embedding_layers.*differs from this model"
    ):
        deltatune.load(model, str(tmp_path))
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
