"""Evaluation: the eval loss and the task's metrics (`TaskType.metrics`) on encoded examples.

The task's predictor (`predict.py`) answers every example; each metric the row names compares those
answers with the references. A metric whose optional package is missing (BLEU, ROUGE-L) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import metrics
from .encode import collate
from .predict import EvalContext, batches, on_device
from .tasks import TaskType


@dataclass
class Evaluation:
    """Metric values (`loss` included) and the predictions next to the references."""

    metrics: dict[str, float]
    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)


def eval_loss(model: nn.Module, task: TaskType, features: list[dict[str, Any]], context: EvalContext) -> float:
    """Mean of the task loss over the batches of `features`."""
    losses = [
        task.loss(model, on_device(collate(batch, context.pad_id), context.device)).item()
        for batch in batches(features, context.batch_size)
    ]
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: TaskType, features: list[dict[str, Any]], context: EvalContext, with_loss: bool = True
) -> Evaluation:
    """The task's metrics (those whose packages are installed) on `features`."""
    was_training = model.training
    model.eval()
    try:
        result = Evaluation({"loss": eval_loss(model, task, features, context)} if with_loss else {})
        result.predictions, result.references = task.predictor(model, features, context)
        for name, metric in task.metrics.items():
            if metrics.available(name):
                result.metrics[name] = metric(result.predictions, result.references)
        return result
    finally:
        model.train(was_training)
