"""`deltatune merge MODEL ADAPTER OUT`: a full model folder that transformers loads by itself and that
computes what the unmerged model computes."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.train.cli import main
from training_fixtures import MODELS, model_folder


@pytest.mark.parametrize(
    "task,config",
    [
        ("causal-lm", deltatune.LoraConfig(r=4, target_modules="all-linear")),
        ("seq-cls", deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])),
        ("token-cls", deltatune.BitFitConfig()),
    ],
    ids=["lora-llama", "lora-and-head-llama-cls", "bitfit-bert"],
)
def test_merged_folder_loads_with_automodel_and_matches_the_unmerged_model(task: str, config, tmp_path) -> None:
    _, auto_class, _ = MODELS[task]
    folder = model_folder(tmp_path, task)
    delta_model = deltatune.attach(auto_class.from_pretrained(folder), config).eval()
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    delta_model.save(str(tmp_path / "adapter"))
    assert main(["merge", str(folder), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0

    merged = auto_class.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(9, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, delta_model(input_ids=ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not any("deltatune" in name for name, _ in merged.named_modules())
