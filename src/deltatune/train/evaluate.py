"""Evaluation: the eval loss and the task's metrics (`TaskType.metrics`) on encoded examples.

Language models generate greedily from each prompt (left-padded batches, up to `max_new_tokens`) and
the decoded text is compared with the reference. Classifiers take the arg-max label; QA the best span
(start ≤ end, at most `MAX_ANSWER_TOKENS`) inside the context; embeddings are judged by retrieval:
is text i closest to its own positive among all positives of the set?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..tasks import IGNORE_INDEX, TaskType, embed
from . import metrics
from .encode import collate

MAX_ANSWER_TOKENS = 30


@dataclass
class Evaluation:
    """Metric values (`loss` included) and, for text tasks, the predictions next to the references."""

    metrics: dict[str, float]
    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)


def _batches(features: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [features[start:start + size] for start in range(0, len(features), size)]


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _generate(model: nn.Module, prompts: list[list[int]], pad_id: int, max_new_tokens: int, device: torch.device, **extra: Any) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, **extra)
    return output[:, width:].tolist()


def predict_causal(model: nn.Module, batch: list[dict[str, Any]], context: "EvalContext") -> tuple[list, list]:
    prompts = [feature["input_ids"][: feature["prompt_length"]] for feature in batch]
    generated = _generate(model, prompts, context.pad_id, context.max_new_tokens, context.device)
    texts = context.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() for text in texts], [feature["reference"] for feature in batch]


def predict_seq2seq(model: nn.Module, batch: list[dict[str, Any]], context: "EvalContext") -> tuple[list, list]:
    inputs = _on(collate([{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in batch], context.pad_id), context.device)
    output = model.generate(**inputs, max_new_tokens=context.max_new_tokens, do_sample=False)
    texts = context.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [text.strip() for text in texts], [feature["reference"] for feature in batch]


def predict_labels(model: nn.Module, batch: list[dict[str, Any]], context: "EvalContext") -> tuple[list, list]:
    """Sequence and token classification: arg-max labels where a label is set."""
    inputs = _on(collate(batch, context.pad_id), context.device)
    labels = inputs.pop("labels")
    predicted = model(**inputs).logits.argmax(-1)
    keep = labels != IGNORE_INDEX
    return predicted[keep].tolist(), labels[keep].tolist()


def predict_spans(model: nn.Module, batch: list[dict[str, Any]], context: "EvalContext") -> tuple[list, list]:
    inputs = _on(collate(batch, context.pad_id), context.device)
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
        answers.append(feature["context"][span[0][0]:span[1][1]] if span[0] and span[1] else "")
    return answers, [feature["reference"] for feature in batch]


def retrieval_accuracy(model: nn.Module, features: list[dict[str, Any]], context: "EvalContext") -> dict[str, float]:
    """Share of texts whose nearest positive (cosine) among all positives of the set is their own."""
    texts, positives = [], []
    for batch in _batches(features, context.batch_size):
        inputs = _on(collate(batch, context.pad_id), context.device)
        texts.append(embed(model, inputs["input_ids"], inputs["attention_mask"]))
        positives.append(embed(model, inputs["positive_input_ids"], inputs["positive_attention_mask"]))
    nearest = (torch.cat(texts) @ torch.cat(positives).t()).argmax(-1)
    return {"accuracy": (nearest == torch.arange(len(nearest), device=nearest.device)).float().mean().item()}


@dataclass
class EvalContext:
    tokenizer: Any
    device: torch.device
    batch_size: int
    max_new_tokens: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


PREDICTORS: dict[str, Callable[[nn.Module, list[dict[str, Any]], EvalContext], tuple[list, list]]] = {
    "causal-lm": predict_causal,
    "seq2seq-lm": predict_seq2seq,
    "seq-cls": predict_labels,
    "token-cls": predict_labels,
    "qa": predict_spans,
}
METRIC_TABLES = {"causal-lm": metrics.TEXT_METRICS, "seq2seq-lm": metrics.TEXT_METRICS, "qa": metrics.TEXT_METRICS}


def eval_loss(model: nn.Module, task: TaskType, features: list[dict[str, Any]], context: EvalContext) -> float:
    """Mean of the task loss over the batches of `features`."""
    losses = [task.loss(model, _on(collate(batch, context.pad_id), context.device)).item() for batch in _batches(features, context.batch_size)]
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: nn.Module, task: TaskType, features: list[dict[str, Any]], context: EvalContext, with_loss: bool = True) -> Evaluation:
    """The task's metrics (those whose packages are installed) on `features`."""
    was_training = model.training
    model.eval()
    try:
        result = Evaluation({"loss": eval_loss(model, task, features, context)} if with_loss else {})
        if task.name not in PREDICTORS:
            result.metrics.update(retrieval_accuracy(model, features, context))
            return result
        for batch in _batches(features, context.batch_size):
            predicted, expected = PREDICTORS[task.name](model, batch, context)
            result.predictions += predicted
            result.references += expected
        table = METRIC_TABLES.get(task.name, metrics.LABEL_METRICS)
        for name in task.metrics:
            if metrics.available(name):
                result.metrics[name] = table[name](result.predictions, result.references)
        return result
    finally:
        model.train(was_training)
