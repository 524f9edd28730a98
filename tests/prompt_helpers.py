"""Helpers for the soft-prompt tests: a tiny real tokenizer, left-padded prompts, greedy references."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tiny_models import VOCAB, build

WORDS = ["classify", "the", "sentiment", "of", "this", "review", "positive", "negative"]


def tiny_tokenizer_folder(folder: Path) -> Path:
    """A WordLevel tokenizer (ids 3.. for WORDS, 0 pad, 1 bos, 2 eos) saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        **{word: 3 + index for index, word in enumerate(WORDS)},
        "<unk>": 3 + len(WORDS),
    }
    assert max(vocabulary.values()) < VOCAB
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(folder))
    return folder


PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15, 16]]
"""Three prompts of different lengths."""


def left_padded(prompts: list[list[int]] = PROMPTS, side: str = "left") -> dict[str, torch.Tensor]:
    """The prompts as one batch, padded with 0 on `side`, with the attention mask."""
    width = max(map(len, prompts))
    pad = lambda row, fill: [fill] * (width - len(row))  # noqa: E731
    join = (lambda row, fill: pad(row, fill) + row) if side == "left" else (lambda row, fill: row + pad(row, fill))
    input_ids = torch.tensor([join(p, 0) for p in prompts])
    attention_mask = torch.tensor([join([1] * len(p), 0) for p in prompts])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy_by_forward(model: nn.Module, prompt: list[int], steps: int, seq2seq: bool) -> list[int]:
    """Greedy decoding of one unpadded prompt with full forward calls (no cache, no generate())."""
    source = torch.tensor([prompt])
    generated = torch.tensor([[0]]) if seq2seq else source
    with torch.no_grad():
        for _ in range(steps):
            inputs = {"input_ids": source, "decoder_input_ids": generated} if seq2seq else {"input_ids": generated}
            next_token = model(**inputs).logits[:, -1].argmax(-1, keepdim=True)
            generated = torch.cat([generated, next_token], dim=1)
    return generated[0, -steps:].tolist()


def generate_new_tokens(
    model: nn.Module, inputs: dict[str, torch.Tensor], steps: int, seq2seq: bool, **options
) -> list[list[int]]:
    """The `steps` tokens generate() adds to each row (greedy unless `options` say otherwise)."""
    options = {"max_new_tokens": steps, "do_sample": False, "pad_token_id": 0, "eos_token_id": None, **options}
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    return output[:, -steps:].tolist()


def lively(arch: str) -> nn.Module:
    """The tiny model with weights scaled up, so that greedy decoding does not repeat one token."""
    model = build(arch)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    return model
