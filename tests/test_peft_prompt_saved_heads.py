"""peft soft-prompt folders of classification models carry `modules_to_save` (peft adds the head):

- one made with TEXT init from a tokenizer that this machine lacks loads, and gives peft's logits: the
  weights come from the file (the placement says so), so no tokenizer is opened, whatever the config
  went through (`replace()` dropped the fact when it was an attribute of the config);
- peft names those copies `base_model.<path>` (no `model.`: its soft prompts wrap the model directly),
  and a folder we save with format="peft" names them so, or peft would silently keep its own head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune
from prompt_helpers import tiny_tokenizer_folder
from tiny_models import build

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

INPUTS = {"input_ids": torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))}


def make_peft_text_prompt_folder(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A prompt-tuning folder saved by peft for sequence classification (so with modules_to_save), TEXT
    init from a tokenizer folder that is then removed: the trainer's machine had it, this one has not."""
    tokenizer = tiny_tokenizer_folder(tmp_path / "trainer-tokenizer")
    config = peft.PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment of this review",
        tokenizer_name_or_path=str(tokenizer),
    )
    peft_model = peft.get_peft_model(build("bert"), config)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    folder = tmp_path / "peft-prompt"
    peft_model.save_pretrained(str(folder))
    shutil.rmtree(tokenizer)
    return folder, peft_model.eval()


def test_a_peft_text_init_prompt_folder_with_modules_to_save_loads_without_its_tokenizer(tmp_path: Path) -> None:
    folder, peft_model = make_peft_text_prompt_folder(tmp_path)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["modules_to_save"] and saved["prompt_tuning_init"] == "TEXT"
    assert not Path(saved["tokenizer_name_or_path"]).exists()
    loaded = deltatune.load(build("bert"), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**INPUTS).logits, peft_model(**INPUTS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        lambda: deltatune.PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["classifier"]),
        lambda: deltatune.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16, modules_to_save=["classifier"]),
    ],
    ids=["prompt_tuning", "p_tuning"],
)
def test_our_peft_prompt_folder_with_modules_to_save_loads_in_peft_with_our_head(config, tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("bert"), config())
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn_like(parameter))
    delta_model.eval()
    with torch.no_grad():
        expected = delta_model(**INPUTS).logits
    delta_model.save(str(tmp_path / "ours"), format="peft")
    peft_model = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**INPUTS).logits, expected, atol=1e-5, rtol=1e-5)
    again = deltatune.load(build("bert"), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**INPUTS).logits, expected, atol=0, rtol=0)
