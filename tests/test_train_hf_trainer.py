"""A deltatune adapter trains with transformers' own `Trainer`: the loss falls and only the adapter's
parameters change."""

from __future__ import annotations

import pytest
import torch

import deltatune
from training_fixtures import model_folder, records, word_tokenizer

pytest.importorskip("accelerate")


def test_the_adapter_trains_with_transformers_trainer(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tokenizer = word_tokenizer(pair_template=False)
    rows = []
    for record in records("causal-lm"):
        ids = tokenizer(f"{record['prompt']} {record['completion']}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    model = AutoModelForCausalLM.from_pretrained(model_folder(tmp_path, "causal-lm"))
    delta_model = deltatune.attach(model, deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {name: p.detach().clone() for name, p in delta_model.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(model=delta_model, args=arguments, train_dataset=rows)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    changed = {name for name, p in delta_model.named_parameters() if not torch.equal(p, before[name])}
    adapter = {name for name, p in delta_model.named_parameters() if p.requires_grad}
    assert changed and changed == adapter


def test_trainer_resume_refuses_a_checkpoint_of_another_adapter_config_before_a_step(tmp_path) -> None:
    """`train(resume_from_checkpoint=...)` with an adapter whose config differs from the checkpoint's (lora_alpha
    8 → 64: the same tensors, an 8 times larger delta) stops before it copies a weight or takes a step."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from deltatune.errors import CheckpointMismatchError

    tokenizer = word_tokenizer(pair_template=False)
    rows = []
    for record in records("causal-lm"):
        ids = tokenizer(f"{record['prompt']} {record['completion']}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    folder = model_folder(tmp_path, "causal-lm")
    trainer_class = deltatune.adapter_trainer(Trainer)

    def trainer(lora_alpha: int, steps: int) -> tuple[deltatune.DeltaModel, Trainer]:
        config = deltatune.LoraConfig(r=4, lora_alpha=lora_alpha, target_modules="all-linear")
        delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), config)
        arguments = TrainingArguments(
            output_dir=str(tmp_path / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=4,
            save_steps=2,
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        return delta_model, trainer_class(model=delta_model, args=arguments, train_dataset=rows)

    trainer(lora_alpha=8, steps=2)[1].train()
    delta_model, resumed = trainer(lora_alpha=64, steps=4)
    before = {name: p.detach().clone() for name, p in delta_model.named_parameters()}
    with pytest.raises(CheckpointMismatchError, match="lora_alpha: 8 → 64"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    assert resumed.state.global_step == 0
    assert all(torch.equal(p, before[name]) for name, p in delta_model.named_parameters())
