"""TRL's SFTTrainer and DPOTrainer, and transformers' Trainer, made by `deltatune.adapter_trainer`, train a
`DeltaModel` as the stock classes train a peft model: the loss falls, the base weights stay bit-identical, only
adapter parameters change, and `save_model()` writes an adapter folder that deltatune and peft load to the
trained model's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune
from training_fixtures import model_folder, records, word_tokenizer

pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
pytest.importorskip("datasets", reason="TRL's trainers take `datasets` data sets (pip install datasets)")

from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

STEPS = 6
LORA = deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
COMMON = dict(
    max_steps=STEPS,
    per_device_train_batch_size=4,
    learning_rate=2e-2,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,  # TRL's configs default to bfloat16 autocast, which stays on the model's forward after training
    seed=0,
)


def _sft_rows(kind: str) -> list[dict[str, Any]]:
    """The causal-LM records as TRL's three SFT data formats."""
    pairs = [(record["prompt"], record["completion"]) for record in records("causal-lm")]
    if kind == "text":
        return [{"text": f"{prompt} {completion}"} for prompt, completion in pairs]
    if kind == "prompt-completion":
        return [{"prompt": prompt, "completion": " " + completion} for prompt, completion in pairs]
    return [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
        for prompt, completion in pairs
    ]


def _preference_rows() -> list[dict[str, str]]:
    """Pairs preferring the record's own completion to one that names the wrong animal."""
    rows = []
    for record in records("causal-lm", count=8):
        color, animal = record["prompt"].split()
        wrong = "dog" if animal != "dog" else "cat"
        rows.append({"prompt": record["prompt"], "chosen": f" the {animal} is {color}", "rejected": f" {wrong} no"})
    return rows


def _tokenized_rows() -> Dataset:
    """Token ids and labels, plus a text column the model does not take (`remove_unused_columns` drops it)."""
    tokenizer = word_tokenizer(pair_template=False)
    rows = []
    for record in records("causal-lm"):
        text = f"{record['prompt']} {record['completion']}"
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": ids, "text": text})
    return Dataset.from_list(rows)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _check_trained(trainer: Any, delta_model: deltatune.DeltaModel, before: dict[str, torch.Tensor]) -> None:
    """The loss fell, the base weights are bit-identical and exactly the adapter's parameters changed."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and sum(losses[-2:]) < sum(losses[:2]), losses
    changed = {name for name, p in delta_model.named_parameters() if not torch.equal(p, before[name])}
    adapter = {name for name, p in delta_model.named_parameters() if p.requires_grad}
    assert changed and changed == adapter
    assert all(".deltatune." in name for name in adapter)


def _check_saved(trainer: Any, delta_model: deltatune.DeltaModel, base_folder: Path, out: Path, peft: bool) -> None:
    """`save_model()` wrote an adapter folder (no full model) that deltatune, and peft for format="peft", load
    onto a fresh base to the trained model's logits."""
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    inputs = {"input_ids": torch.tensor([[1, 9, 10, 11, 12, 13], [1, 20, 21, 22, 23, 24]])}
    delta_model.eval()
    with torch.no_grad():
        trained = delta_model(**inputs).logits
        loaded = deltatune.load(AutoModelForCausalLM.from_pretrained(base_folder), str(out))
        torch.testing.assert_close(loaded(**inputs).logits, trained, atol=1e-5, rtol=0)
        if peft:
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), str(out))
            torch.testing.assert_close(peft_model(**inputs).logits, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["text", "prompt-completion", "conversational"])
def test_sft_trainer_trains_only_the_adapter_and_saves_its_folder(tmp_path: Path, kind: str) -> None:
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
    before = _snapshot(delta_model)
    trainer = deltatune.adapter_trainer(SFTTrainer, format="peft")(
        model=delta_model,
        args=SFTConfig(output_dir=str(tmp_path / "run"), **COMMON),
        train_dataset=Dataset.from_list(_sft_rows(kind)),
        processing_class=word_tokenizer(pair_template=False),
    )
    assert trainer.args.loss_type == "chunked_nll"  # TRL's default, the path that crashed on a DeltaModel
    trainer.train()
    _check_trained(trainer, delta_model, before)
    _check_saved(trainer, delta_model, folder, tmp_path / "adapter", peft=True)


def test_dpo_reference_is_the_base_model_with_adapters_off(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
    before = _snapshot(delta_model)
    trainer = deltatune.adapter_trainer(DPOTrainer)(
        model=delta_model,
        args=DPOConfig(output_dir=str(tmp_path / "run"), beta=0.5, **COMMON),
        train_dataset=Dataset.from_list(_preference_rows()),
        processing_class=word_tokenizer(pair_template=False),
    )
    trainer.train()
    _check_trained(trainer, delta_model, before)
    inputs = {"input_ids": torch.tensor([[1, 9, 10, 11, 12, 13]])}
    with torch.no_grad():
        reference = trainer.ref_model(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(folder)(**inputs).logits
        assert not torch.allclose(delta_model(**inputs).logits, base)  # the trained adapter runs outside the block
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    _check_saved(trainer, delta_model, folder, tmp_path / "adapter", peft=False)


def test_transformers_trainer_saves_the_adapter_folder_and_checkpoints(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
    before = _snapshot(delta_model)
    trainer = deltatune.adapter_trainer(Trainer, format="peft")(
        model=delta_model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            **{**COMMON, "save_strategy": "steps", "save_steps": STEPS},
        ),
        train_dataset=_tokenized_rows(),
    )
    trainer.train()
    _check_trained(trainer, delta_model, before)
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    _check_saved(trainer, delta_model, folder, tmp_path / "adapter", peft=True)


def test_chunked_loss_refuses_an_adapted_output_layer(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "causal-lm")
    config = deltatune.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), config)
    with pytest.raises(deltatune.DeltaTuneError, match="loss_type='nll'"):
        deltatune.adapter_trainer(SFTTrainer)(
            model=delta_model,
            args=SFTConfig(output_dir=str(tmp_path / "run"), **COMMON),
            train_dataset=Dataset.from_list(_sft_rows("text")),
            processing_class=word_tokenizer(pair_template=False),
        )


def test_other_models_train_as_with_the_stock_class(tmp_path: Path) -> None:
    """A model that is not a `DeltaModel` (here peft's) goes through the stock trainer's own branches."""
    from peft import LoraConfig, get_peft_model

    folder = model_folder(tmp_path, "causal-lm")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear")
    )
    trainer = deltatune.adapter_trainer(Trainer)(
        model=peft_model,
        args=TrainingArguments(output_dir=str(tmp_path / "run"), **{**COMMON, "max_steps": 1}),
        train_dataset=_tokenized_rows(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "adapter"))


def test_resuming_from_an_adapter_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    """Six steps straight, and three steps then a resume from the adapter checkpoint at step 3 (into a freshly
    attached model), end with bit-identical adapter weights."""
    folder = model_folder(tmp_path, "causal-lm")
    finals = []
    for run, resume in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoint-3")):
        delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
        trainer = deltatune.adapter_trainer(Trainer)(
            model=delta_model,
            args=TrainingArguments(
                output_dir=str(tmp_path / run),
                **{**COMMON, "save_strategy": "steps", "save_steps": 3},
            ),
            train_dataset=_tokenized_rows(),
        )
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        finals.append({name: p.detach().clone() for name, p in delta_model.named_parameters() if p.requires_grad})
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
    trainer = deltatune.adapter_trainer(Trainer)(
        model=delta_model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,  # "best" is the highest eval loss: an early checkpoint, so a load is seen
            **{**COMMON, "save_strategy": "steps", "save_steps": 2},
        ),
        train_dataset=_tokenized_rows(),
        eval_dataset=_tokenized_rows().select(range(4)),
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != f"checkpoint-{STEPS}"
    expected = deltatune.load(AutoModelForCausalLM.from_pretrained(folder), str(best))
    trained = {name: p for name, p in delta_model.named_parameters() if p.requires_grad}
    assert trained.keys() == {name for name, _ in expected.named_parameters() if ".deltatune." in name}
    assert all(torch.equal(p, expected.get_parameter(name)) for name, p in trained.items())


def test_save_model_into_output_dir_keeps_every_checkpoint_whole(tmp_path: Path) -> None:
    """`trainer.save_model()` (into `args.output_dir`, the usual last line of a script) saves the adapter
    beside the `checkpoint-N/` folders, each kept with its optimizer, scheduler, RNG and trainer state."""
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(AutoModelForCausalLM.from_pretrained(folder), LORA)
    run = tmp_path / "run"
    args = TrainingArguments(output_dir=str(run), **{**COMMON, "save_strategy": "steps", "save_steps": 1})
    trainer = deltatune.adapter_trainer(Trainer)(model=delta_model, args=args, train_dataset=_tokenized_rows())
    trainer.train()
    checkpoints = {path: path.read_bytes() for path in run.glob("checkpoint-*/*") if path.is_file()}
    assert any(path.name == "trainer_state.json" for path in checkpoints)
    trainer.save_model()
    assert {path: path.read_bytes() for path in run.glob("checkpoint-*/*") if path.is_file()} == checkpoints
    assert (run / "adapter_model.safetensors").is_file()
