"""Evaluation: the eval loss and the task's metrics (`TaskType.metrics`) on encoded examples.

What it costs, per task (each example is read once per pass, in batches grouped by length):

- seq-cls, token-cls, qa, feature-extraction: one pass. The forward that answers an example also
  gives its loss (`predict.py`).
- causal-lm, seq2seq-lm: one teacher-forced loss pass (the task's `loss`, on prompt and reference),
  then the generation, once per distinct prompt: a language model's loss and its answer come from
  different inputs. With `with_loss=False` the loss pass is skipped.

Both passes advance one progress bar (unit: examples; shown when `progress`, on stderr, cleared at the
end). The eval loss is the mean over its terms in the whole eval set: per labelled token for the
token-level losses (causal-lm, seq2seq-lm, token-cls), per example for seq-cls and qa; each batch's
mean is weighted by its number of terms (`predict.LossSum`), so the value does not depend on
`eval_batch_size` or on how the examples were grouped. Feature extraction's loss is the contrastive
loss over the whole set (see `predict.py`). The task's predictor answers every example; each metric the
row names compares those answers with the references, a generated text with every reference of its
prompt (`prompt_groups.py`, which also says when `references_per_prompt` is reported). A metric whose
optional package is missing (BLEU, ROUGE-L) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics, prompt_groups
from .predict import Bar, EvalContext, LossSum, length_batches
from .tasks import TaskType


@dataclass
class Evaluation:
    """Metric values (`loss` included) and the predictions next to the references."""

    metrics: dict[str, float]
    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)


def teacher_forced_loss(
    model: nn.Module, task: TaskType, features: list[dict[str, Any]], context: EvalContext, bar: Bar
) -> LossSum:
    """The task loss summed over its terms (`task.loss_terms` of each batch); a batch with none (every
    label cut by max_length) adds nothing."""
    loss = LossSum()
    for _, _, inputs in length_batches(features, context, bar):
        terms = task.loss_terms(inputs)
        if terms:
            loss.add(task.loss(model, inputs), terms)
    return loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: TaskType,
    features: list[dict[str, Any]],
    context: EvalContext,
    with_loss: bool = True,
    progress: bool = True,
) -> Evaluation:
    """The task's metrics (those whose packages are installed) on `features`, with a progress bar."""
    separate_loss = with_loss and task.loss_terms is not None
    was_training = model.training
    model.eval()
    total = len(features) * (2 if separate_loss else 1)
    bar = tqdm(total=total, desc="eval", unit="example", leave=False, disable=not progress, dynamic_ncols=True)
    try:
        if separate_loss:
            bar.set_description("eval (loss)")
            loss = teacher_forced_loss(model, task, features, context, bar)
            bar.set_description("eval (generation)")
        answers = task.predictor(model, features, context, bar)
        if not separate_loss:
            loss = answers.loss
        result = Evaluation({"loss": loss.mean()} if with_loss and loss is not None else {})
        result.predictions, result.references = answers.predictions, answers.references
        predictions, references = prompt_groups.scored(answers)
        for name, metric in task.metrics.items():
            if metrics.available(name):
                result.metrics[name] = metric(predictions, references)
        result.metrics.update(prompt_groups.grouping_report(answers))
        return result
    finally:
        bar.close()
        model.train(was_training)
