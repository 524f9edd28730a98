"""The trainer's stops for a run that has gone wrong: a non-finite loss or gradient, a gradient that is exactly
zero while the loss is not (nothing can move the adapter any more), non-finite weights before a save. Each stop
is one line saying what was seen, the likely cause and what is kept; no adapter is saved from such a run.

The optimizer's state is checked where the weights are (before each checkpoint and before the adapter is
saved), not every step: an AdamW second moment (exp_avg_sq) of inf makes every later update of its elements
exactly 0 while loss, gradient and weights stay finite, so a run would otherwise train nothing and save."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import TrainingDivergedError
from . import sharding
from .checkpoint import latest_checkpoint
from .config import TrainConfig


def check_step(config: TrainConfig, step: int, loss: float, gradient_norm: float) -> None:
    """Stop at a step whose loss or gradient norm is non-finite, or whose gradient is exactly zero
    while the loss is not: a saturated (or disconnected) adapter that no further step can move."""
    if not math.isfinite(loss + gradient_norm):
        raise _diverged(
            config,
            step,
            f"the loss is {loss:.4g} and the gradient norm {gradient_norm:.4g}",
            before_any_update=step == 1,
        )
    if gradient_norm == 0.0 and loss > 0.0:
        if step == 1:
            raise TrainingDivergedError(
                f"step 1: the gradient is exactly zero at loss {loss:.4g}: the adapter does not reach the loss; "
                "check target_modules (and that the task's labels are not all ignored)"
            )
        raise _diverged(
            config,
            step,
            f"the gradient is exactly zero at loss {loss:.4g}, so no step can move the adapter",
            before_any_update=False,
        )


def check_weights(
    config: TrainConfig, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, step: int
) -> None:
    """Stop before a save if an update has left a trainable weight, or the optimizer's state, non-finite."""
    if not sharding.all_finite(parameters):
        raise _diverged(config, step, "the adapter's weights are non-finite after its update", before_any_update=False)
    bad = [key for key, tensors in _optimizer_state(optimizer).items() if not sharding.all_finite(tensors)]
    if bad:
        raise _diverged(
            config,
            step,
            f"the optimizer's state ({', '.join(bad)}) is non-finite after its update, so it cannot move the adapter",
            before_any_update=False,
        )


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    """The optimizer's floating-point state tensors by key (AdamW: step, exp_avg, exp_avg_sq), in the
    parameters' order, the same on every rank."""
    by_key: dict[str, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    by_key.setdefault(key, []).append(value)
    return by_key


def _diverged(config: TrainConfig, step: int, what: str, before_any_update: bool) -> TrainingDivergedError:
    """The one-line error for a non-finite step: what was seen, the likely cause, what is kept."""
    if before_any_update:
        cause = " before any update: the model's weights or the adapter config give non-finite values, check them"
    else:
        cause = f"; the learning rate ({config.learning_rate:g}) is likely too high, lower it"
    kept = latest_checkpoint(Path(config.output_dir))
    saved = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was written"
    return TrainingDivergedError(f"training diverged at step {step}: {what}{cause}; no adapter was saved and {saved}")
