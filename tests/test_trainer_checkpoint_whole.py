"""A trainer's checkpoint (`adapter_trainer`, `save_steps`) holds the whole adapter, whatever format its final
folder is saved in: `train(resume_from_checkpoint=...)` then continues the run bit-exactly. peft's format keeps
the prompt a P-tuning encoder (or a prefix-tuning MLP) computes, not the encoder's weights: such a checkpoint is
written in deltatune's format, while a format that keeps the adapter whole (peft's LoRA) stays the checkpoint's,
so peft still loads those checkpoints as it loads its own."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import deltatune
from training_fixtures import model_folder, records, word_tokenizer

pytest.importorskip("accelerate")

METHODS = {
    "p_tuning": deltatune.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix_tuning": deltatune.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
    "lora": deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.2),
}
"""Two adapters whose peft folders keep less than what trains (an encoder's output), and one kept whole."""
STEPS, SAVE_STEPS = 4, 2


def _rows() -> list[dict[str, torch.Tensor]]:
    tokenizer = word_tokenizer(pair_template=False)
    rows = []
    for record in records("causal-lm"):
        ids = tokenizer(f"{record['prompt']} {record['completion']}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return rows


def _train(
    base: Path, output_dir: Path, method: str, resume: Path | None = None
) -> tuple[deltatune.DeltaModel, object]:
    """`STEPS` steps of `method` with transformers' `Trainer`, adapter folders in peft's format, a checkpoint
    every `SAVE_STEPS`; from `resume` where given."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(base), METHODS[method])
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        save_steps=SAVE_STEPS,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = deltatune.adapter_trainer(Trainer, format="peft")(
        model=delta_model, args=arguments, train_dataset=_rows()
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return delta_model, trainer


def _trained(delta_model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in delta_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_trainer_resumes_bit_exactly_from_its_checkpoint_whatever_the_adapter_format(
    tmp_path: Path, method: str
) -> None:
    """Four steps straight, and the same run resumed from its step-2 checkpoint into a freshly attached
    adapter, end with bit-identical adapter weights."""
    base = model_folder(tmp_path, "causal-lm")
    straight, _ = _train(base, tmp_path / "straight", method)
    resumed, _ = _train(base, tmp_path / "resumed", method, resume=tmp_path / "straight" / f"checkpoint-{SAVE_STEPS}")
    expected, found = _trained(straight), _trained(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[name], found[name]) for name in expected)


@pytest.mark.parametrize("method,checkpoint_kind", [("p_tuning", "deltatune"), ("lora", "peft")])
def test_a_checkpoint_keeps_the_adapter_format_only_where_that_format_keeps_the_adapter_whole(
    tmp_path: Path, method: str, checkpoint_kind: str
) -> None:
    """The checkpoint is in peft's format where peft's keeps every tensor (peft loads it to the same logits),
    else in deltatune's, said once in a warning; the folder `save_model()` writes is in peft's format either way
    (peft's causal-LM prompt also returns the virtual positions: the real ones are compared)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltatune.io import folder_kind

    base = model_folder(tmp_path, "causal-lm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta_model, trainer = _train(base, tmp_path / "run", method)
    said = [str(warning.message) for warning in caught if "checkpoints are saved in deltatune" in str(warning.message)]
    assert len(said) == (checkpoint_kind == "deltatune"), said
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS}"
    assert folder_kind(checkpoint) == checkpoint_kind
    trainer.save_model(str(tmp_path / "final"))
    assert folder_kind(tmp_path / "final") == "peft"
    inputs = {"input_ids": torch.tensor([[1, 9, 10, 11, 12, 13]])}
    delta_model.eval()
    with torch.no_grad():
        expected = delta_model(**inputs).logits
        for folder in [tmp_path / "final"] + ([checkpoint] if checkpoint_kind == "peft" else []):
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder)).eval()
            logits = peft_model(**inputs).logits[:, -inputs["input_ids"].shape[1] :]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
