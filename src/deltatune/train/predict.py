"""Predictors: what a task's model answers on encoded examples, next to the expected answers.

Each is `predict(model, features, context) -> (predictions, references)`, the pair a task's metrics
compare. Language models generate greedily from each prompt (left-padded batches, up to
`max_new_tokens`) and the decoded text is compared with the reference. Classifiers take the arg-max
label; QA the best span (start ≤ end, at most `MAX_ANSWER_TOKENS`) inside the context; embeddings are
judged by retrieval: the prediction for text i is the positive nearest to it among all positives of
the set, the reference is i.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..losses import IGNORE_INDEX, embed
from .encode import collate

MAX_ANSWER_TOKENS = 30


@dataclass
class EvalContext:
    tokenizer: Any
    device: torch.device
    batch_size: int
    max_new_tokens: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


Predictor = Callable[[nn.Module, list[dict[str, Any]], EvalContext], tuple[list, list]]


def batches(features: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [features[start : start + size] for start in range(0, len(features), size)]


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def by_batch(predict: Predictor) -> Predictor:
    """A predictor over all features from one that answers a batch at a time (`context.batch_size`)."""

    @functools.wraps(predict)
    def over_all(model: nn.Module, features: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
        predictions, references = [], []
        for batch in batches(features, context.batch_size):
            predicted, expected = predict(model, batch, context)
            predictions += predicted
            references += expected
        return predictions, references

    return over_all


def _generate(
    model: nn.Module, prompts: list[list[int]], pad_id: int, max_new_tokens: int, device: torch.device
) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    output = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
    )
    return output[:, width:].tolist()


@by_batch
def predict_causal(model: nn.Module, batch: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
    prompts = [feature["input_ids"][: feature["prompt_length"]] for feature in batch]
    generated = _generate(model, prompts, context.pad_id, context.max_new_tokens, context.device)
    texts = context.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() for text in texts], [feature["reference"] for feature in batch]


@by_batch
def predict_seq2seq(model: nn.Module, batch: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
    inputs = on_device(
        collate([{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in batch], context.pad_id),
        context.device,
    )
    output = model.generate(**inputs, max_new_tokens=context.max_new_tokens, do_sample=False)
    texts = context.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [text.strip() for text in texts], [feature["reference"] for feature in batch]


@by_batch
def predict_labels(model: nn.Module, batch: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
    """Sequence and token classification: arg-max labels where a label is set."""
    inputs = on_device(collate(batch, context.pad_id), context.device)
    labels = inputs.pop("labels")
    predicted = model(**inputs).logits.argmax(-1)
    keep = labels != IGNORE_INDEX
    return predicted[keep].tolist(), labels[keep].tolist()


@by_batch
def predict_spans(model: nn.Module, batch: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
    inputs = on_device(collate(batch, context.pad_id), context.device)
    for key in ("start_positions", "end_positions"):
        inputs.pop(key)
    output = model(**inputs)
    answers = []
    for row, feature in enumerate(batch):
        inside = torch.tensor([offset is not None for offset in feature["offsets"]], device=context.device)
        length = len(feature["offsets"])
        start = output.start_logits[row, :length].masked_fill(~inside, float("-inf"))
        end = output.end_logits[row, :length].masked_fill(~inside, float("-inf"))
        scores = start[:, None] + end[None, :]
        allowed = torch.triu(torch.ones(length, length, dtype=torch.bool, device=context.device))
        allowed &= ~torch.triu(allowed, diagonal=MAX_ANSWER_TOKENS)
        best = int(scores.masked_fill(~allowed, float("-inf")).argmax())
        first, last = divmod(best, length)
        span = feature["offsets"][first], feature["offsets"][last]
        answers.append(feature["context"][span[0][0] : span[1][1]] if span[0] and span[1] else "")
    return answers, [feature["reference"] for feature in batch]


def predict_nearest(model: nn.Module, features: list[dict[str, Any]], context: EvalContext) -> tuple[list, list]:
    """Embeddings: the index of the positive (cosine) nearest to each text among all positives of the
    set, against the text's own index."""
    texts, positives = [], []
    for batch in batches(features, context.batch_size):
        inputs = on_device(collate(batch, context.pad_id), context.device)
        texts.append(embed(model, inputs["input_ids"], inputs["attention_mask"]))
        positives.append(embed(model, inputs["positive_input_ids"], inputs["positive_attention_mask"]))
    nearest = (torch.cat(texts) @ torch.cat(positives).t()).argmax(-1)
    return nearest.tolist(), list(range(len(nearest)))
