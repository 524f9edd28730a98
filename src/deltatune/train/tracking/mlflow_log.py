"""MLflow: a run in the experiment `MLFLOW_EXPERIMENT_NAME` (or "deltatune") of the tracking server
`MLFLOW_TRACKING_URI`, or, when that is not set, of a local file store in `OUTPUT_DIR/mlruns`; the
config as the run's parameters. MLflow 3 keeps the file store only on request: for that local store
`MLFLOW_ALLOW_FILE_STORE` is set to true unless the environment sets it (view it with
`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri OUTPUT_DIR/mlruns`). mlflow-skinny is enough.
A link at `OUTPUT_DIR/mlruns`, or inside it, is refused before the model loads (`outputs.check_no_links`),
whatever `MLFLOW_TRACKING_URI` says: to keep the store elsewhere, set `MLFLOW_TRACKING_URI`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from . import scalar_settings

MLRUNS_FOLDER = "mlruns"
DEFAULT_EXPERIMENT = "deltatune"
PARAMETERS_PER_CALL = 100
"""MLflow takes at most 100 parameters in one `log_batch`."""
PARAMETER_LENGTH = 6000
"""MLflow's longest parameter value; longer ones are cut."""


def tracking_uri(output_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the file store in `output_dir/mlruns`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (output_dir / MLRUNS_FOLDER).resolve().as_uri()


class MlflowTracker:
    def __init__(self, output_dir: Path, run_name: str, hyperparameters: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(output_dir))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        settings = scalar_settings(hyperparameters)
        parameters = [Param(key, str(value)[:PARAMETER_LENGTH]) for key, value in settings.items()]
        for start in range(0, len(parameters), PARAMETERS_PER_CALL):
            self.client.log_batch(self.run_id, params=parameters[start : start + PARAMETERS_PER_CALL])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, now, step) for name, value in values.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


def open_tracker(output_dir: Path, run_name: str, hyperparameters: dict[str, Any]) -> MlflowTracker:
    return MlflowTracker(output_dir, run_name, hyperparameters)
