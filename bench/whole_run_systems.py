"""One system of the whole-run benchmark in this (worker) process: `python whole_run_systems.py SYSTEM
SPEC.json RESULT.json`. SYSTEM is deltatune (the `deltatune train` command, with a config file written
here), peft-trainer (peft + transformers `Trainer`, each batch padded to its longest example by
`DataCollatorForSeq2Seq`) or trl-packing (TRL `SFTTrainer`, prompt/completion records, completion-only
loss, packing with its padding-free `position_ids` mode). Each is given the same `RunSpec`.

The run is timed from after the imports (which every system pays the same way) to the adapter saved;
its peak memory is the process's resident high-water mark (VmHWM) above what it held after the imports.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import current_memory_bytes, peak_memory_bytes, reset_peak_memory  # noqa: E402
from whole_run_data import encode, read_jsonl  # noqa: E402
from whole_run_spec import LINEAR_LAYERS, RunSpec  # noqa: E402


def _deltatune_config(spec: RunSpec) -> dict[str, Any]:
    return {
        "model": spec.deltatune_model,
        "task": "causal-lm",
        "train_file": spec.train_file,
        "output_dir": spec.output_dir,
        "overwrite_output_dir": True,
        "adapter": {
            "method": "lora",
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.lora_dropout,
            "target_modules": "all-linear",
        },
        "max_length": spec.max_length,
        "epochs": spec.epochs,
        "max_steps": spec.max_steps,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "weight_decay": spec.weight_decay,
        "warmup_steps": spec.warmup_steps,
        "scheduler": spec.scheduler,
        "max_grad_norm": spec.max_grad_norm,
        "seed": spec.seed,
        "bf16": False,
        "device": "cpu",
        "threads": spec.threads,  # the spec's count, as the other systems get it (not the busy-machine choice)
    }


def _import_deltatune() -> Callable[[RunSpec], dict[str, Any]]:
    import yaml

    import deltatune.train.loop  # noqa: F401  (the command imports it when it starts training)
    from deltatune.train.cli import main

    def run(spec: RunSpec) -> dict[str, Any]:
        config = Path(spec.output_dir).parent / f"{Path(spec.output_dir).name}-config.yaml"
        config.write_text(yaml.safe_dump(_deltatune_config(spec), sort_keys=False))
        status = main(["train", str(config), *spec.deltatune_overrides, "--quiet"])
        if status:
            raise SystemExit(f"deltatune train exited with status {status}")
        metrics = json.loads((Path(spec.output_dir) / "metrics.json").read_text())
        return {"steps": metrics["steps"], "config": str(config), "overrides": spec.deltatune_overrides}

    return run


def _peft_model(spec: RunSpec) -> tuple[Any, Any, Any]:
    """The base model, its tokenizer and the LoRA config the two peft-based systems share."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec.model, local_files_only=True, dtype=torch.float32)
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=LINEAR_LAYERS,
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, lora


def _training_arguments(spec: RunSpec, arguments_class: type, **extra: Any) -> Any:
    return arguments_class(
        output_dir=spec.output_dir,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.scheduler,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def _import_peft_trainer() -> Callable[[RunSpec], dict[str, Any]]:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    def run(spec: RunSpec) -> dict[str, Any]:
        model, tokenizer, lora = _peft_model(spec)
        model = get_peft_model(model, lora)
        examples = [encode(tokenizer, record, spec.max_length) for record in read_jsonl(spec.train_file)]
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = Trainer(
            model=model,
            args=_training_arguments(spec, TrainingArguments),
            train_dataset=examples,
            data_collator=collator,
        )
        trainer.train()
        model.save_pretrained(str(spec.adapter_dir()))
        return {"steps": trainer.state.global_step}

    return run


def _import_trl_packing() -> Callable[[RunSpec], dict[str, Any]]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def run(spec: RunSpec) -> dict[str, Any]:
        model, tokenizer, lora = _peft_model(spec)
        rows = spec.packed_rows or spec.batch_size
        arguments = _training_arguments(
            spec,
            SFTConfig,
            max_length=spec.max_length,
            packing=True,
            packing_strategy="bfd",
            padding_free=True,
            completion_only_loss=True,
            gradient_checkpointing=False,  # TRL's default is on; off as in the other systems
            dataset_num_proc=None,
        )
        arguments.per_device_train_batch_size = rows
        trainer = SFTTrainer(
            model=model,
            args=arguments,
            train_dataset=Dataset.from_list(read_jsonl(spec.train_file)),
            processing_class=tokenizer,
            peft_config=lora,
        )
        packed_tokens = sum(len(row) for row in trainer.train_dataset["input_ids"])
        trainer.train()
        trainer.model.save_pretrained(str(spec.adapter_dir()))
        return {"steps": trainer.state.global_step, "rows_per_step": rows, "packed_tokens": packed_tokens}

    return run


SYSTEMS: dict[str, Callable[[], Callable[[RunSpec], dict[str, Any]]]] = {
    "deltatune": _import_deltatune,
    "peft-trainer": _import_peft_trainer,
    "trl-packing": _import_trl_packing,
}
"""System name → its imports, returning the function that runs it."""


def main(argv: list[str]) -> int:
    system, spec_path, result_path = argv
    spec = RunSpec.read(spec_path)
    import torch

    torch.set_num_threads(spec.threads)
    run = SYSTEMS[system]()
    gc.collect()
    reset_peak_memory()
    after_imports = current_memory_bytes()
    started = time.perf_counter()
    details = run(spec)
    seconds = time.perf_counter() - started
    result = {
        "system": system,
        "run_seconds": seconds,
        "after_imports_bytes": after_imports,
        "peak_bytes": peak_memory_bytes(),
        "peak_added_bytes": max(peak_memory_bytes() - after_imports, 0),
        "threads": torch.get_num_threads(),
        **details,
    }
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
