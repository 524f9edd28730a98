"""Prefix tuning generates the same tokens with and without the cache: with `use_cache=False` every
step must see the prefix and the sequence exactly once (the base model hands back no cache then, so
neither may the prefix's). Reference: greedy decoding through peft's forward on the same weights
(peft's own generate() departs from its forward with prefix tuning on transformers 5)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from prompt_helpers import PROMPTS, generate_new_tokens, greedy_by_forward, left_padded, lively

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 6
TASKS = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def peft_prefix_folder(arch: str, base: torch.nn.Module, folder: Path, seed: int = 3) -> torch.nn.Module:
    """A peft prefix-tuning adapter with random weights saved in `folder`; peft's model loaded from it."""
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.PrefixTuningConfig(num_virtual_tokens=4, task_type=TASKS[arch])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in theirs.prompt_encoder.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    theirs.save_pretrained(str(folder))
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@pytest.mark.parametrize("arch", list(TASKS))
def test_greedy_generate_without_cache_gives_the_tokens_of_generate_with_cache(arch: str, tmp_path: Path) -> None:
    base = lively(arch)
    theirs = peft_prefix_folder(arch, base, tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    seq2seq = arch == "t5"
    inputs = left_padded(side="left" if arch == "llama" else "right")
    expected = [greedy_by_forward(theirs, prompt, STEPS, seq2seq) for prompt in PROMPTS]
    assert expected != [greedy_by_forward(base, prompt, STEPS, seq2seq) for prompt in PROMPTS]
    assert generate_new_tokens(ours, inputs, STEPS, seq2seq, use_cache=False) == expected
    assert generate_new_tokens(ours, inputs, STEPS, seq2seq, use_cache=True) == expected


def test_a_mixed_batch_generates_without_cache_what_each_adapter_generates_alone(tmp_path: Path) -> None:
    base = lively("llama")
    references = [peft_prefix_folder("llama", base, tmp_path / name, seed) for name, seed in (("a", 3), ("b", 5))]
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    routes = ["a", "b", None]
    expected = [greedy_by_forward(model, prompt, STEPS, False) for model, prompt in zip([*references, base], PROMPTS)]
    assert generate_new_tokens(ours, left_padded(), STEPS, False, use_cache=False, adapter_names=routes) == expected


def test_a_forward_call_without_cache_returns_no_cache() -> None:
    """As the base model: `use_cache=False` hands back no cache, whatever the adapter built inside."""
    ours = deltatune.attach(lively("llama"), deltatune.PrefixTuningConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad():
        output = ours(input_ids=torch.tensor([PROMPTS[0]]), use_cache=False)
        cached = ours(input_ids=torch.tensor([PROMPTS[0]]), use_cache=True)
    assert all(value is None or not hasattr(value, "get_seq_length") for value in output.values())
    assert any(hasattr(value, "get_seq_length") for value in cached.values())
