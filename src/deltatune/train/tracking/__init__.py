"""Experiment trackers: the config's `report_to` sends every row of metrics.json to TensorBoard,
Weights & Biases and/or MLflow as the run writes it, with the config as hyperparameters.

A tracker is anything with `log(values, step)` and `close(finished)` (`Tracker`); each lives in its own
file with an `open_tracker(output_dir, run_name, hyperparameters)` function, found by name in
`TRACKERS`. Each needs its own optional package (`pip install 'deltatune[tracking]'` brings all three);
a run that names a missing one stops before the data is read, in one line that names the extra.

Names as trackers show them: a training row's `loss`, `learning_rate` and `tokens_per_second` become
`train/loss`, `train/learning_rate` and `train/tokens_per_second`; an evaluation's `eval_<metric>`
becomes `eval/<metric>` (so each tracker groups them in two sections). Only the main process reports.
A tracker that fails mid-run (its server down, its disk full) is warned of in one line and dropped; the run
goes on and saves, and metrics.json holds every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from ...errors import DeltaTuneError

logger = logging.getLogger("deltatune")

NO_TRACKER = "none"
EVAL_PREFIX = "eval_"


class TrackerMissingError(DeltaTuneError):
    """`report_to` names a tracker whose package is not installed."""


class TrackerStartError(DeltaTuneError):
    """A tracker's package refused to start a run (a bad setting in its environment variables, say)."""


class Tracker(Protocol):
    """One experiment tracker's run."""

    def log(self, values: dict[str, float], step: int) -> None:
        """Record `values` (tracker names, see `tracked_name`) at optimizer step `step`."""

    def close(self, finished: bool) -> None:
        """End the run: `finished` false when training stopped on an error."""


@dataclasses.dataclass(frozen=True)
class TrackerSpec:
    """Where a tracker's code is (a module of this package) and the package it needs."""

    module: str
    package: str


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard_log", "tensorboard"),
    "wandb": TrackerSpec("wandb_log", "wandb"),
    "mlflow": TrackerSpec("mlflow_log", "mlflow"),
}
"""`report_to` name → its tracker."""


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers `report_to` names, in order, without repeats and without "none"."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in dict.fromkeys(names) if name != NO_TRACKER]


def require_trackers(names: list[str]) -> None:
    """Stop, in one line naming the extra, if a named tracker's package is not installed."""
    for name in names:
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise TrackerMissingError(
                f"report_to names {name}, whose package {package} is not installed: pip install "
                f"'deltatune[tracking]' (or remove {name} from report_to)"
            )


def tracked_name(key: str) -> str:
    """A metrics.json row key as trackers show it: `eval_accuracy` → `eval/accuracy`, `loss` → `train/loss`."""
    return f"eval/{key[len(EVAL_PREFIX) :]}" if key.startswith(EVAL_PREFIX) else f"train/{key}"


class Trackers:
    """The trackers a run reports to, opened by `start`; before it, or with none, every call does nothing.

    A tracker only mirrors metrics.json, so its failure never costs the run: one that fails to record a row
    (its server down, its disk full) is warned of in one line, ended as failed and sent nothing more; one
    that fails to end its run is warned of, and the run's own result (or error) stands."""

    def __init__(self, names: list[str], output_dir: Path) -> None:
        self.names, self.output_dir = names, output_dir
        self.trackers: dict[str, Tracker] = {}

    def start(self, settings: dict[str, Any], enabled: bool = True) -> None:
        """Open every tracker with the run's `settings` as hyperparameters (nested mappings under dotted
        names, `adapter.r`). Not `enabled` (a process other than the main one): none."""
        from ..fingerprint import _dotted as dotted_settings

        if not enabled:
            return
        hyperparameters = dotted_settings(settings)
        for name in self.names:
            module = importlib.import_module(f"{__name__}.{TRACKERS[name].module}")
            try:
                tracker = module.open_tracker(self.output_dir, self.output_dir.resolve().name, hyperparameters)
            except Exception as error:  # the tracker package's own errors, whatever their class
                raise TrackerStartError(
                    f"report_to {name}: {TRACKERS[name].package} could not start a run ({_one_line(error)}); "
                    "check its settings in the environment, or remove it from report_to"
                ) from error
            self.trackers[name] = tracker

    def log(self, row: dict[str, float]) -> None:
        """Send one metrics.json row ({"step": ..., name: value, ...}) to every tracker; drop one that fails."""
        if not self.trackers:
            return
        values = {tracked_name(key): float(value) for key, value in row.items() if key != "step"}
        step = int(row["step"])
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(values, step)
            except Exception as error:  # the tracker package's own errors, whatever their class
                del self.trackers[name]
                logger.warning(
                    f"report_to {name}: {TRACKERS[name].package} could not record step {step} ({_one_line(error)}); "
                    "it is sent nothing more this run, and metrics.json keeps every row"
                )
                with contextlib.suppress(Exception):  # ended as failed where it still can be; warned of above
                    tracker.close(False)

    def close(self, finished: bool) -> None:
        """End every tracker's run (`finished` false when training stopped on an error)."""
        trackers, self.trackers = self.trackers, {}
        for name, tracker in trackers.items():
            try:
                tracker.close(finished)
            except Exception as error:  # the tracker package's own errors, whatever their class
                logger.warning(
                    f"report_to {name}: {TRACKERS[name].package} could not end its run ({_one_line(error)}); "
                    "metrics.json keeps every row"
                )


@contextlib.contextmanager
def reporting(report_to: str | list[str], output_dir: Path) -> Iterator[Trackers]:
    """The trackers `report_to` names (each package checked first), closed after the block: as failed
    if it raised."""
    names = tracker_names(report_to)
    require_trackers(names)
    trackers = Trackers(names, output_dir)
    try:
        yield trackers
    except BaseException:
        trackers.close(finished=False)
        raise
    trackers.close(finished=True)


def scalar_settings(hyperparameters: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Settings as the scalars trackers take: numbers, booleans and text kept, anything else (lists,
    null) as its JSON text."""
    return {
        name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for name, value in hyperparameters.items()
    }


SHOWN_ERROR_LENGTH = 240
"""A tracker package's error is shown on one line, cut to this many characters."""


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= SHOWN_ERROR_LENGTH else text[: SHOWN_ERROR_LENGTH - 3] + "..."
