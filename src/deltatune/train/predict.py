"""Predictors: what a task's model answers on encoded examples, next to the expected answers, and the
eval loss where the forward that answers gives it too.

Each is `predict(model, features, context, bar) -> Answers`. Examples are read in batches of
`context.batch_size` grouped by length (`by_length`: longest first, so a batch pads little), the
answers are put back in the order of `features`, and `bar` advances by the examples each batch read.

- Classifiers (seq-cls, token-cls) and QA: one forward per batch, labels included, gives the model's
  own loss and the logits. Classifiers answer the arg-max label (tag) where a label is set; QA the best
  span (start ≤ end, at most `MAX_ANSWER_TOKENS`) inside the context.
- Embeddings: each text and each positive is embedded once; the prediction for text i is the positive
  nearest to it (cosine) among all positives of the set, the reference is i. The loss is the
  contrastive loss against those same candidates: `CE(scale · cos(a_i, p_j) over all j, i)`, the
  in-batch loss of training with the whole set as the batch, so it does not depend on the batching.
- Language models generate greedily from each prompt (left-padded batches, up to `max_new_tokens`) and
  the decoded text is compared with the reference; their task rows run them once per distinct prompt
  (`prompt_groups.py`). Their loss needs teacher forcing, a forward of its own
  (`evaluate.teacher_forced_loss`); these predictors give none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import CONTRASTIVE_SCALE, IGNORE_INDEX, embed
from .encode import collate

MAX_ANSWER_TOKENS = 30
WIDTH_FIELDS = ("input_ids", "positive_input_ids", "labels")
"""The padded token fields whose lengths make an example's share of a batch's width (`by_length`)."""


@dataclass
class EvalContext:
    tokenizer: Any
    device: torch.device
    batch_size: int
    max_new_tokens: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


class Bar(Protocol):
    """What a predictor needs of a progress bar (a `tqdm`): advance by the examples read."""

    def update(self, n: int) -> Any: ...


@dataclass
class LossSum:
    """A loss summed over its terms (examples, or labelled tokens), so that batches of any size add up
    to the mean over the whole set: `Σ_b mean_b · n_b / Σ_b n_b`, not the mean of the batch means
    (which weighs a short last batch, or a batch of few labelled tokens, as much as a full one)."""

    total: float = 0.0
    terms: int = 0

    def add(self, batch_mean: torch.Tensor, terms: int) -> None:
        if terms:
            self.total += float(batch_mean) * terms
            self.terms += terms

    def mean(self) -> float:
        return self.total / self.terms if self.terms else math.nan


@dataclass
class Answers:
    """Predictions and references in the order of the features, the eval loss if the predictor's
    forward gave it, and the prompt groups if it answered once per prompt."""

    predictions: list
    references: list
    loss: LossSum | None = None
    groups: list[list[int]] | None = None
    """Generation answered once per prompt: the indices of each distinct prompt's examples, whose one
    prediction the metrics score against all their references (`prompt_groups.scored`)."""


Predictor = Callable[[nn.Module, list[dict[str, Any]], EvalContext, Bar], Answers]


def padded_width(feature: dict[str, Any]) -> int:
    """The summed length of an example's padded token fields: what sorting by length groups."""
    return sum(len(feature[key]) for key in WIDTH_FIELDS if isinstance(feature.get(key), list))


def by_length(features: list[dict[str, Any]], size: int) -> list[list[int]]:
    """Indices of `features` in batches of `size`, longest first (ties in their order): each batch holds
    examples of about one length, and a batch too big for memory fails first, not last."""
    order = sorted(range(len(features)), key=lambda index: padded_width(features[index]), reverse=True)
    return [order[start : start + size] for start in range(0, len(order), size)]


def length_batches(
    features: list[dict[str, Any]], context: EvalContext, bar: Bar
) -> Iterator[tuple[list[int], list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """(indices, examples, collated tensors on the device) of each `by_length` batch; `bar` advances
    once the batch is answered."""
    for rows in by_length(features, context.batch_size):
        batch = [features[index] for index in rows]
        yield rows, batch, on_device(collate(batch, context.pad_id), context.device)
        bar.update(len(rows))


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Terms of a loss over the labelled positions (seq2seq decoder, token classification)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def next_token_targets(batch: dict[str, torch.Tensor]) -> int:
    """Terms of the causal loss: labelled positions after the first (position t predicts token t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _placed(pairs: dict[int, tuple[Any, Any]], flatten: bool = False) -> tuple[list, list]:
    """(predictions, references) in index order from {index: (prediction, reference)}; `flatten` joins
    per-example lists (token tags) into one list."""
    ordered = [pairs[index] for index in sorted(pairs)]
    if flatten:
        return [p for pair in ordered for p in pair[0]], [r for pair in ordered for r in pair[1]]
    return [pair[0] for pair in ordered], [pair[1] for pair in ordered]


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


def predict_causal(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
    pairs = {}
    for rows, batch, _ in length_batches(features, context, bar):
        prompts = [feature["input_ids"][: feature["prompt_length"]] for feature in batch]
        generated = _generate(model, prompts, context.pad_id, context.max_new_tokens, context.device)
        texts = context.tokenizer.batch_decode(generated, skip_special_tokens=True)
        pairs.update({index: (text.strip(), feature["reference"]) for index, text, feature in zip(rows, texts, batch)})
    return Answers(*_placed(pairs))


def predict_seq2seq(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
    pairs = {}
    for rows, batch, inputs in length_batches(features, context, bar):
        output = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=context.max_new_tokens,
            do_sample=False,
        )
        texts = context.tokenizer.batch_decode(output, skip_special_tokens=True)
        pairs.update({index: (text.strip(), feature["reference"]) for index, text, feature in zip(rows, texts, batch)})
    return Answers(*_placed(pairs))


def predict_labels(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
    """Sequence and token classification: the arg-max label where a label is set; the loss is the
    model's own (a mean over the set labels) from the same forward."""
    pairs, loss = {}, LossSum()
    for rows, _, inputs in length_batches(features, context, bar):
        output = model(**inputs)
        labels = inputs["labels"]
        keep = labels != IGNORE_INDEX
        loss.add(output.loss, int(keep.sum()))
        predicted = output.logits.argmax(-1)
        for row, index in enumerate(rows):
            pairs[index] = predicted[row][keep[row]].tolist(), labels[row][keep[row]].tolist()
    return Answers(*_placed(pairs, flatten=True), loss)


def predict_spans(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
    """QA: the best allowed span inside the context; the loss is the model's own (a mean over the
    examples) from the same forward."""
    pairs, loss = {}, LossSum()
    for rows, batch, inputs in length_batches(features, context, bar):
        output = model(**inputs)
        loss.add(output.loss, len(rows))
        for row, (index, feature) in enumerate(zip(rows, batch)):
            pairs[index] = _best_span(output.start_logits[row], output.end_logits[row], feature), feature["reference"]
    return Answers(*_placed(pairs), loss)


def _best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, feature: dict[str, Any]) -> str:
    """The context text of the highest-scoring span `start + end` with start ≤ end < start + MAX_ANSWER_TOKENS,
    both inside the context; empty if the best span is not."""
    length = len(feature["offsets"])
    inside = torch.tensor([offset is not None for offset in feature["offsets"]], device=start_logits.device)
    start = start_logits[:length].masked_fill(~inside, float("-inf"))
    end = end_logits[:length].masked_fill(~inside, float("-inf"))
    scores = start[:, None] + end[None, :]
    allowed = torch.triu(torch.ones(length, length, dtype=torch.bool, device=start_logits.device))
    allowed &= ~torch.triu(allowed, diagonal=MAX_ANSWER_TOKENS)
    first, last = divmod(int(scores.masked_fill(~allowed, float("-inf")).argmax()), length)
    span = feature["offsets"][first], feature["offsets"][last]
    return feature["context"][span[0][0] : span[1][1]] if span[0] and span[1] else ""


def predict_nearest(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
    """Embeddings: the index of the positive nearest to each text among all positives of the set,
    against the text's own index; the loss is the contrastive loss over that same set."""
    rows, texts, positives = [], [], []
    for batch_rows, _, inputs in length_batches(features, context, bar):
        rows += batch_rows
        texts.append(embed(model, inputs["input_ids"], inputs["attention_mask"]))
        positives.append(embed(model, inputs["positive_input_ids"], inputs["positive_attention_mask"]))
    order = torch.tensor(rows, device=context.device).argsort()
    scores = CONTRASTIVE_SCALE * torch.cat(texts)[order] @ torch.cat(positives)[order].t()
    references = torch.arange(len(features), device=scores.device)
    loss = LossSum()
    loss.add(F.cross_entropy(scores, references), len(features))
    return Answers(scores.argmax(-1).tolist(), references.tolist(), loss)
