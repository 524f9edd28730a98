"""A trainer's resume or best-model load (`restore.restore_weights`) of an AdaLoRA checkpoint whose `rank_pattern`
differs from the model's only because the run's rank budget wrote it (before the ranks were fixed, or in
another process): the model takes the checkpoint's pattern and weights, and computes what it computed when the
checkpoint was saved (the reference). Another setting that differs is still refused, and a refused restore
leaves the model's pattern as it was."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.errors import CheckpointMismatchError, DeltaTuneError
from deltatune.restore import restore_weights
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

TARGETS = ["q_proj", "v_proj"]
KEPT = [True, False, True, False]


def adalora(**settings) -> deltatune.DeltaModel:
    config = deltatune.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=TARGETS, total_step=10, init_lora_weights=False, **settings
    )
    return deltatune.attach(build("llama"), config)


def fix_ranks(delta_model: deltatune.DeltaModel) -> dict[str, list[bool]]:
    """What the budget's last allocation does: mask the pruned triplets and record the pattern."""
    allocator = deltatune.RankAllocator(delta_model, "default")
    pattern = {module_name: list(KEPT) for module_name in allocator.modules}
    with torch.no_grad():
        for adapter in allocator.modules.values():
            adapter.lora_E[~torch.tensor(KEPT)] = 0.0
    allocator.record(pattern)
    return pattern


def perturb(delta_model: deltatune.DeltaModel) -> None:
    with torch.no_grad():
        for parameter in delta_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5)


def test_a_best_checkpoint_from_before_the_ranks_were_fixed_restores_its_weights_and_no_pattern(tmp_path) -> None:
    delta_model = adalora()
    delta_model.save(tmp_path / "checkpoint-2")
    expected = run(delta_model, "llama")
    fix_ranks(delta_model)
    perturb(delta_model)
    restore_weights(delta_model, tmp_path / "checkpoint-2")
    assert delta_model.configs["default"].rank_pattern is None
    torch.testing.assert_close(run(delta_model, "llama"), expected, rtol=0, atol=0)
    delta_model.save(tmp_path / "final")
    saved, final = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("checkpoint-2", "final"))
    assert saved.keys() == final.keys() and all(torch.equal(saved[key], final[key]) for key in saved)


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_a_resume_after_the_ranks_were_fixed_takes_the_checkpoint_pattern(tmp_path, format: str) -> None:
    trained = adalora()
    pattern = fix_ranks(trained)
    trained.save(tmp_path / "checkpoint-8", format=format)
    expected = run(trained, "llama")
    fresh = adalora()
    restore_weights(fresh, tmp_path / "checkpoint-8")
    assert fresh.configs["default"].rank_pattern == pattern
    torch.testing.assert_close(run(fresh, "llama"), expected, rtol=0, atol=0)
    deltatune.RankAllocator(fresh, "default").apply_pattern()  # the steps after the fixing step keep working


def test_another_setting_beside_the_pattern_is_still_refused(tmp_path) -> None:
    trained = adalora(lora_alpha=16)
    fix_ranks(trained)
    trained.save(tmp_path / "checkpoint-8")
    fresh = adalora()
    with pytest.raises(CheckpointMismatchError, match=r"lora_alpha: 16(\.0)? → 8"):
        restore_weights(fresh, tmp_path / "checkpoint-8")
    assert fresh.configs["default"].rank_pattern is None


def test_a_restore_refused_after_taking_the_pattern_leaves_the_model_as_it_was(tmp_path) -> None:
    trained = adalora()
    fix_ranks(trained)
    trained.save(tmp_path / "checkpoint-8")
    weights = tmp_path / "checkpoint-8" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: value for key, value in tensors.items() if not key.endswith("lora_E")}, weights)
    fresh = adalora()
    before = run(fresh, "llama")
    with pytest.raises(DeltaTuneError):
        restore_weights(fresh, tmp_path / "checkpoint-8")
    assert fresh.configs["default"].rank_pattern is None
    assert all(adapter.kept is None for adapter in deltatune.RankAllocator(fresh, "default").modules.values())
    torch.testing.assert_close(run(fresh, "llama"), before, rtol=0, atol=0)


def test_an_adapter_built_pruned_refuses_a_checkpoint_of_another_pattern(tmp_path) -> None:
    adalora().save(tmp_path / "checkpoint-2")
    pruned = adalora(rank_pattern={f"model.layers.{i}.self_attn.{t}": KEPT for i in range(2) for t in TARGETS})
    with pytest.raises(CheckpointMismatchError, match="rank_pattern"):
        restore_weights(pruned, tmp_path / "checkpoint-2")
    assert pruned.configs["default"].rank_pattern is not None


def test_the_trainer_loads_a_best_checkpoint_saved_before_the_ranks_were_fixed(tmp_path) -> None:
    """transformers' Trainer with the budget run at every optimizer step and the highest eval loss counted best
    (an early checkpoint): the model ends with that checkpoint's weights, as deltatune.load gives them."""
    pytest.importorskip("datasets", reason="the Trainer's data here is a datasets.Dataset (pip install datasets)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from training_fixtures import model_folder, records, word_tokenizer

    tokenizer = word_tokenizer(pair_template=False)
    rows = []
    for record in records("causal-lm"):
        ids = tokenizer(f"{record['prompt']} {record['completion']}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": ids})
    folder = model_folder(tmp_path, "causal-lm")
    config = deltatune.AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, target_modules="all-linear"
    )
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), config)
    allocator = deltatune.RankAllocator(delta_model, "default")
    patterns = []

    class Budget(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs) -> None:
            allocator.update_and_allocate(state.global_step)
            patterns.append(allocator.config.rank_pattern)

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    data = Dataset.from_list(rows)
    trainer = deltatune.adapter_trainer(Trainer)(
        model=delta_model, args=arguments, train_dataset=data, eval_dataset=data.select(range(4)), callbacks=[Budget()]
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    expected = deltatune.load(AutoModelForCausalLM.from_pretrained(folder), best)
    assert expected.configs["default"].rank_pattern != patterns[-1]  # the best is from before the ranks were fixed
    assert delta_model.configs["default"].rank_pattern == expected.configs["default"].rank_pattern
    inputs = {"input_ids": torch.tensor([rows[0]["input_ids"]])}
    with torch.no_grad():
        torch.testing.assert_close(delta_model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)
