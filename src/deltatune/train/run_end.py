"""The end of a training run: the last check of its weights, the adapter saved, the final evaluation, the report.

The order is what keeps a finished run's work: the weights and the optimizer's state are checked (a diverged
run saves nothing), the adapter is saved before the final evaluation (an evaluation that fails or is
interrupted loses no training: the error says where the adapter is and how to evaluate it again), then
`metrics.json` and the plot are written and the adapter saved again with the final metrics on its card.
Every save happens in the main process with the whole adapter in hand (gathered under FSDP).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import FinalEvaluationError
from . import distributed, sharding
from .checkpoint import ADAPTER_FOLDER, TrainerState
from .divergence import check_weights
from .evaluate import Evaluation
from .tracking import Trackers

if TYPE_CHECKING:
    from .loop import Run


@dataclass
class TrainResult:
    """What a finished run leaves: the trained model, its history and final evaluation."""

    run: Run
    history: list[dict[str, float]]
    final: Evaluation | None
    output_dir: Path
    seconds: float
    steps: int = 0
    """The optimizer steps taken (a time budget decides them as the run goes)."""
    train_seconds: float = 0.0
    """The training time alone (`TrainingClock`: evaluations and saves left out)."""


@dataclass(frozen=True)
class RunEnd:
    """What the loop hands over after its last step."""

    run: Run
    ranks: distributed.Ranks
    state: TrainerState
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    trackers: Trackers
    progress: bool
    started: float
    """`time.perf_counter()` at the start of the run's first step."""
    train_seconds: float


def finish(end: RunEnd) -> TrainResult:
    """Check, save, evaluate and report the run `end` describes (see the module's docstring)."""
    run, ranks, state = end.run, end.ranks, end.state
    output_dir = Path(run.config.output_dir)
    check_weights(run.config, end.parameters, end.optimizer, state.step)
    adapter_folder = str(output_dir / ADAPTER_FOLDER)
    by_main_with_whole_adapter(run, ranks, functools.partial(run.delta_model.save, adapter_folder))
    final = _final_evaluation(run, ranks, state, end.progress, end.trackers) if run.eval_features else None
    seconds = time.perf_counter() - end.started
    extra = {"train_seconds": round(end.train_seconds, 2), "config": state.run["config"]}  # settings as resolved
    report = functools.partial(run.write_report, output_dir, state.history, final, seconds, extra)
    if final is None:
        by_main_with_whole_adapter(run, ranks, report)
    else:  # saved again, for its card to list the final metrics
        by_main_with_whole_adapter(
            run, ranks, functools.partial(run.delta_model.save, adapter_folder, metrics=final.metrics), report
        )
    return TrainResult(run, state.history, final, output_dir, seconds, state.step, end.train_seconds)


def by_main_with_whole_adapter(run: Run, ranks: distributed.Ranks, *actions: Callable[[], object]) -> None:
    """Run `actions` (saves, the report) in the main process with the whole adapter in hand (gathered where
    it is sharded), the other processes waiting."""
    with sharding.whole_adapter(run.delta_model):
        if ranks.main:
            for action in actions:
                action()
    distributed.barrier(ranks)


def _final_evaluation(
    run: Run, ranks: distributed.Ranks, state: TrainerState, progress: bool, trackers: Trackers
) -> Evaluation | None:
    """The evaluation after the last step, the adapter already saved: a failure (an error, a Ctrl-C) says
    in one line where the adapter is, then stops the run."""
    folder = Path(run.config.output_dir) / ADAPTER_FOLDER
    saved = f"the trained adapter is saved at {folder}"
    again = run.evaluate_again or f"deltatune.train.prepare_run(config, adapter={str(folder)!r}).evaluate()"
    try:
        return evaluate_into(run, ranks, state, progress, trackers)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{saved}; the final evaluation did not finish") from None
    except Exception as error:
        raise FinalEvaluationError(
            f"{saved}, but the final evaluation failed ({type(error).__name__}: {error}); evaluate it with "
            f"`{again}` once the cause is fixed"
        ) from error


def evaluate_into(
    run: Run, ranks: distributed.Ranks, state: TrainerState, progress: bool, trackers: Trackers
) -> Evaluation | None:
    """Evaluate on rank 0 (its own progress bar if `progress`) and add `eval_<metric>` to the history;
    the other ranks wait, or, holding shards of the model (FSDP), run the same evaluation alongside (a
    forward pass needs every rank)."""
    result = None
    if ranks.main or distributed.sharded(ranks, run.config.data_parallel):
        result = run.evaluate(progress=progress and ranks.main)
    if ranks.main:
        state.history.append({"step": state.step, **{f"eval_{name}": value for name, value in result.metrics.items()}})
        trackers.log(state.history[-1])
        tqdm.write("step {}: {}".format(state.step, ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())))
    distributed.barrier(ranks)
    return result
