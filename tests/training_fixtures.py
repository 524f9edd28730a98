"""Tiny model folders (model + word-level tokenizer, saved as transformers folders), small data sets
for every task type, and YAML config writing: what the trainer tests feed `deltatune train`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

SPECIALS = ["[PAD]", "<s>", "</s>", "[UNK]", "[CLS]", "[SEP]", "<user>", "<bot>", "<sys>"]
WORDS = (
    "zero one two three four five six seven eight nine ten red green blue black white cat dog bird fish "
    "cow apple pear plum fig lime is the a where what in on at big small hot cold good bad yes no color "
    "fruit animal number city paris rome oslo lima kyiv run walk sit eat see"
).split()
VOCAB_SIZE = 96
NUMBERS = WORDS[:11]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<' + {'user': 'user', 'assistant': 'bot', 'system': 'sys'}[message['role']] + '> ' "
    "+ message['content'] + ' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<bot> ' }}{% endif %}"
)


def word_tokenizer(pair_template: bool) -> PreTrainedTokenizerFast:
    """Whitespace words from `WORDS` (others are [UNK]); BERT-style [CLS]/[SEP] for encoders, <s> else."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    if pair_template:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama(hidden_size: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _bert() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )


def _t5() -> T5Config:
    return T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    )


MODELS: dict[str, tuple[Callable[[], Any], Any, bool]] = {
    "causal-lm": (_llama, AutoModelForCausalLM, False),
    "seq2seq-lm": (_t5, AutoModelForSeq2SeqLM, False),
    "seq-cls": (_llama, AutoModelForSequenceClassification, False),
    "token-cls": (_bert, AutoModelForTokenClassification, True),
    "qa": (_bert, AutoModelForQuestionAnswering, True),
    "feature-extraction": (_bert, AutoModel, True),
}
"""Task → (tiny config, auto class, whether the tokenizer uses [CLS]/[SEP])."""

ARCHITECTURES: dict[str, tuple[Callable[[], Any], bool]] = {
    "llama": (_llama, False),
    "llama-64": (lambda: _llama(hidden_size=64), False),
    "bert": (_bert, True),
    "t5": (_t5, False),
}
"""Another backbone for a task's model: name → (tiny config, whether the tokenizer uses [CLS]/[SEP]).
`llama-64` is 64 wide, for quantized bases: bitsandbytes quantizes in blocks of 64."""


def model_folder(root: Path, task: str, seed: int = 0, arch: str | None = None) -> Path:
    """A saved tiny model (and tokenizer) for `task` under `root`; `arch` picks another backbone."""
    make_config, auto_class, pair_template = MODELS[task]
    if arch is not None:
        make_config, pair_template = ARCHITECTURES[arch]
    folder = root / f"tiny-{task}{'-' + arch if arch else ''}"
    torch.manual_seed(seed)
    auto_class.from_config(make_config()).save_pretrained(folder)
    word_tokenizer(pair_template).save_pretrained(folder)
    return folder


def save_two_adapters(model: torch.nn.Module, folder: Path) -> Path:
    """`folder` holding two LoRA adapters of `model`, a (q_proj) and b (v_proj), each changing the output."""
    import deltatune

    delta_model = deltatune.attach(
        model, deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name="a"
    )
    delta_model.add("b", deltatune.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    delta_model.save(str(folder))
    return folder


def save_float16_overflow(model: torch.nn.Module, target: str, folder: Path) -> Path:
    """`folder` holding a LoRA of `model` on `target` whose ΔW is 9e4 (past float16's 65504) at row 0, column 0 of
    each such layer, and 0 elsewhere: finite in float32, inf once cast to float16."""
    import deltatune

    delta_model = deltatune.attach(model, deltatune.LoraConfig(r=2, lora_alpha=2, target_modules=[target]))
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.zero_()[0, 0] = 300.0
    delta_model.save(str(folder))
    return folder


def records(task: str, count: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """A small learnable data set for `task`."""
    rng = random.Random(seed)
    animals, colors = ["cat", "dog", "bird", "fish", "cow"], ["red", "green", "blue", "black", "white"]
    rows = []
    for index in range(count):
        animal, color = animals[index % 5], colors[rng.randrange(5)]
        words = rng.sample(WORDS[11:40], 4)
        rows.append(
            {
                "causal-lm": lambda: {"prompt": f"{color} {animal}", "completion": f"the {animal} is {color}"},
                "seq2seq-lm": lambda: {"prompt": f"{color} {animal}", "completion": f"{animal} {color}"},
                "seq-cls": lambda: {
                    "text": " ".join(words + [["good", "bad"][index % 2]]),
                    "label": ["yes", "no"][index % 2],
                },
                "token-cls": lambda: {"tokens": words + [NUMBERS[index % 11]], "tags": ["O"] * 4 + ["NUM"]},
                "qa": lambda: {
                    "question": f"where is the {animal}",
                    "context": f"the {animal} is in {['paris', 'rome', 'oslo'][index % 3]} {' '.join(words)}",
                    "answer": ["paris", "rome", "oslo"][index % 3],
                },
                "feature-extraction": lambda: {
                    "text": f"{animal} {color} {words[0]}",
                    "positive": f"{words[0]} {color} {animal}",
                },
            }[task]()
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_config(path: Path, **settings: Any) -> Path:
    path.write_text(
        yaml.safe_dump({key: (str(value) if isinstance(value, Path) else value) for key, value in settings.items()}),
        encoding="utf-8",
    )
    return path


def task_config(
    tmp_path: Path, task: str, method: dict[str, Any] | None = None, arch: str | None = None, **settings: Any
) -> Path:
    """A YAML config that trains a tiny `task` model (backbone `arch`, or the task's own) on its small
    data set (full batch, high rate)."""
    data = write_jsonl(tmp_path / f"{task}.jsonl", records(task))
    adapter = method or {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    defaults = {
        "model": model_folder(tmp_path, task, arch=arch),
        "task": task,
        "train_file": data,
        "eval_file": data,
        "adapter": adapter,
        "output_dir": tmp_path / "out",
        "batch_size": 16,
        "max_steps": 6,
        "learning_rate": 0.02,
        "scheduler": "constant",
        "max_length": 32,
        "max_new_tokens": 6,
        "seed": 0,
    }
    return write_config(tmp_path / f"{task}.yaml", **{**defaults, **settings})
