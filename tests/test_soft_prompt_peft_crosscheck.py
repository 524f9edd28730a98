"""Soft prompts against peft with the same weights: prompt tuning, P-tuning (MLP, LSTM) and prefix tuning
(plain table, MLP projection) on tiny Llama (grouped-query attention: 4 query, 2 key/value heads) and T5.

- a folder saved by peft loads here and gives peft's logits (atol 1e-5) on a left-padded batch. Our
  outputs cover the real tokens only; peft's causal-LM prompt tuning also returns the n virtual
  positions, which are dropped from its logits before comparing;
- greedy generate() of a left-padded batch (T5: right-padded, see `padded`) of 3 prompts of different
  lengths gives, token for token, what peft's model computes for each prompt alone (greedy decoding
  through peft's forward). peft's own
  generate() is not the reference: with peft 0.21.2 its left-padded rows differ from the same prompts
  alone on transformers 5 (positions ignore the padding), and for T5 prefix tuning it drops the prefix
  on transformers 5 (the cache keyword was renamed) and disagrees with its own forward on 4.57;
- a folder we save with format="peft" loads in peft and gives our logits and greedy tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from prompt_helpers import PROMPTS, generate_new_tokens, greedy_by_forward, left_padded, lively

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
STEPS = 6
VIRTUAL = 4
TASKS = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

PEFT_CONFIGS = {
    "prompt_tuning": lambda task: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL, task_type=task),
    "p_tuning_mlp": lambda task: peft.PromptEncoderConfig(
        num_virtual_tokens=VIRTUAL, task_type=task, encoder_hidden_size=16
    ),
    "p_tuning_lstm": lambda task: peft.PromptEncoderConfig(
        num_virtual_tokens=VIRTUAL, task_type=task, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix_tuning": lambda task: peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type=task),
    "prefix_projection": lambda task: peft.PrefixTuningConfig(
        num_virtual_tokens=VIRTUAL, task_type=task, prefix_projection=True, encoder_hidden_size=16
    ),
}
OUR_CONFIGS = {
    "prompt_tuning": lambda: deltatune.PromptTuningConfig(num_virtual_tokens=VIRTUAL),
    "p_tuning_mlp": lambda: deltatune.PTuningConfig(num_virtual_tokens=VIRTUAL, encoder_hidden_size=16),
    "p_tuning_lstm": lambda: deltatune.PTuningConfig(
        num_virtual_tokens=VIRTUAL, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix_tuning": lambda: deltatune.PrefixTuningConfig(num_virtual_tokens=VIRTUAL),
    "prefix_projection": lambda: deltatune.PrefixTuningConfig(
        num_virtual_tokens=VIRTUAL, prefix_projection=True, encoder_hidden_size=16
    ),
}
GRID = [pytest.param(method, arch, id=f"{method}-{arch}") for method in PEFT_CONFIGS for arch in TASKS]


def randomize(parameters, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def padded(arch: str) -> dict[str, torch.Tensor]:
    """Left padding for the decoder-only model; T5's encoder input is padded on the right, as its
    tokenizer does (T5's relative positions ignore position ids: left padding would sit between the
    virtual tokens and the text, in peft as here)."""
    return left_padded(side="left" if arch == "llama" else "right")


def real_logits(model: torch.nn.Module, arch: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6, 7]] * 3)} if arch == "t5" else {}
    with torch.no_grad():
        logits = model(**inputs, **extra).logits
    return logits[:, -inputs["input_ids"].shape[1] :] if arch == "llama" else logits


def peft_folder(method: str, arch: str, base: torch.nn.Module, folder: Path) -> peft.PeftModel:
    """A peft adapter with random weights saved in `folder`, and peft's model loaded from that folder."""
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](TASKS[arch])).eval()
    randomize(theirs.prompt_encoder.parameters(), seed=3)
    theirs.save_pretrained(str(folder))
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@pytest.mark.parametrize("method,arch", GRID)
def test_peft_folder_loads_with_peft_logits(method: str, arch: str, tmp_path: Path) -> None:
    base = lively(arch)
    theirs = peft_folder(method, arch, base, tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    inputs = padded(arch)
    expected = real_logits(theirs, arch, inputs)
    torch.testing.assert_close(real_logits(ours, arch, inputs), expected, atol=ATOL, rtol=0)
    assert (expected - real_logits(base, arch, inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("method,arch", GRID)
def test_greedy_generate_of_left_padded_batch_matches_peft_token_for_token(
    method: str, arch: str, tmp_path: Path
) -> None:
    base = lively(arch)
    theirs = peft_folder(method, arch, base, tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    expected = [greedy_by_forward(theirs, prompt, STEPS, arch == "t5") for prompt in PROMPTS]
    assert generate_new_tokens(ours, padded(arch), STEPS, arch == "t5") == expected
    assert expected != [greedy_by_forward(base, prompt, STEPS, arch == "t5") for prompt in PROMPTS]


@pytest.mark.parametrize("method,arch", GRID)
def test_our_peft_folder_loads_in_peft(method: str, arch: str, tmp_path: Path) -> None:
    base = lively(arch)
    ours = deltatune.attach(copy.deepcopy(base), OUR_CONFIGS[method]()).eval()
    randomize(ours.adapter_parameters("default"), seed=4)
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    inputs = padded(arch)
    torch.testing.assert_close(real_logits(theirs, arch, inputs), real_logits(ours, arch, inputs), atol=ATOL, rtol=0)
    expected = [greedy_by_forward(theirs, prompt, STEPS, arch == "t5") for prompt in PROMPTS]
    assert generate_new_tokens(ours, padded(arch), STEPS, arch == "t5") == expected


def test_peft_seq2seq_prompt_keeps_the_encoder_rows(tmp_path: Path) -> None:
    """peft's T5 prompt table has n rows per transformer submodule (2n); the encoder reads the first n."""
    base = lively("t5")
    theirs = peft_folder("prompt_tuning", "t5", base, tmp_path)
    assert theirs.peft_config["default"].num_transformer_submodules == 2
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path))
    table = next(ours.adapter_parameters("default"))
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight[:VIRTUAL], atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(TASKS))
def test_default_prefix_projection_has_peft_shapes(arch: str) -> None:
    """Same config, same trainable tensors: the MLP's width defaults to peft's (kv_heads · head_dim)."""
    base = lively(arch)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type=TASKS[arch], prefix_projection=True),
    )
    ours = deltatune.attach(
        copy.deepcopy(base), deltatune.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, prefix_projection=True)
    )
    their_shapes = sorted(tuple(p.shape) for p in theirs.prompt_encoder.parameters())
    assert sorted(tuple(p.shape) for p in ours.adapter_parameters("default")) == their_shapes
