"""peft's `task_type` in the folders we save: peft picks its model class from it, and only its task classes
apply a soft prompt (a plain `PeftModel` runs the base model alone, so a prompt saved with no task type
would silently do nothing in peft).

- the task type of a transformers class is the one of transformers' own auto class that lists it
  (`GPT2LMHeadModel` is a causal LM though its name does not end in `ForCausalLM`; Gemma 3's
  `...ForConditionalGeneration` is a causal LM, T5's a seq2seq LM);
- a soft prompt saved from GPT-2's LM head model loads in peft and gives our logits (peft is the reference);
- a soft prompt on a model peft has no task type for (GPT-2's double-heads model) is refused before
  anything is written.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import deltatune
from deltatune.errors import UnsupportedFormatError
from deltatune.peft_format import task_type_of
from tiny_models import build, token_inputs

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASS_TASKS = {
    "GPT2LMHeadModel": "CAUSAL_LM",
    "OpenAIGPTLMHeadModel": "CAUSAL_LM",
    "XLNetLMHeadModel": "CAUSAL_LM",
    "Gemma3ForConditionalGeneration": "CAUSAL_LM",
    "LlamaForCausalLM": "CAUSAL_LM",
    "T5ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "BertForSequenceClassification": "SEQ_CLS",
    "BertForTokenClassification": "TOKEN_CLS",
    "BertForQuestionAnswering": "QUESTION_ANS",
    "MyCustomForCausalLM": "CAUSAL_LM",
    "MyCustomLMHeadModel": "CAUSAL_LM",
    "GPT2Model": None,
}
"""Class name → peft task type: transformers' auto classes list the first nine; the custom names (a model
of remote code, in no auto class) go by their suffix; a bare model has none."""

SOFT_PROMPTS = {
    "prompt_tuning": lambda: deltatune.PromptTuningConfig(num_virtual_tokens=3),
    "p_tuning": lambda: deltatune.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix_tuning": lambda: deltatune.PrefixTuningConfig(num_virtual_tokens=3),
}


@pytest.mark.parametrize("class_name,task", CLASS_TASKS.items(), ids=list(CLASS_TASKS))
def test_task_type_is_that_of_the_transformers_auto_class(class_name: str, task: str | None) -> None:
    model = type(class_name, (nn.Module,), {})()
    assert task_type_of(model) == task


def randomized(model: deltatune.DeltaModel) -> deltatune.DeltaModel:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("method", SOFT_PROMPTS)
def test_soft_prompt_saved_from_gpt2_lm_head_model_gives_our_logits_in_peft(method: str, tmp_path: Path) -> None:
    base = build("gpt2")
    ours = randomized(deltatune.attach(copy.deepcopy(base), SOFT_PROMPTS[method]()))
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = token_inputs(1)["input_ids"]
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[:, -ids.shape[1] :]
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("method", SOFT_PROMPTS)
def test_soft_prompt_on_a_model_without_peft_task_type_is_refused_and_nothing_written(
    method: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    two_heads = transformers.GPT2DoubleHeadsModel(build("gpt2").config).eval()  # in no auto class of a peft task
    ours = deltatune.attach(two_heads, SOFT_PROMPTS[method]())
    kept = tmp_path / "notes.txt"
    kept.write_text("mine")
    with pytest.raises(UnsupportedFormatError, match="task type"):
        ours.save(str(tmp_path), format="peft")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert kept.read_text() == "mine"
