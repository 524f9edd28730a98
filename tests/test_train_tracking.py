"""`report_to`: what TensorBoard, MLflow and Weights & Biases hold after a run, read back with each
tracker's own reader (TensorBoard's event-file reader, MLflow's client, W&B's record protocol), equals
metrics.json row by row; a tracker whose package is missing stops the run in one line naming the extra."""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from pathlib import Path

import pytest
import yaml

from deltatune.train import tracking
from deltatune.train.checkpoint import checkpoint_folder
from deltatune.train.cli import main
from deltatune.train.config import ConfigError, TrainConfig
from deltatune.train.fingerprint import run_record
from deltatune.train.loop import train
from training_fixtures import task_config

# each tracker's own reader against metrics.json: tracker packages, not transformers, decide what this proves
pytestmark = pytest.mark.transformers_independent

TRACKED_NAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "eval_accuracy": "eval/accuracy",
    "eval_f1": "eval/f1",
}
"""metrics.json row keys → the names trackers show."""
INSTALLED = [name for name, spec in tracking.TRACKERS.items() if importlib.util.find_spec(spec.package)]


def needs(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"{tracking.TRACKERS[name].package} is not installed (pip install 'deltatune[tracking]')")


def tracker_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracker setting in the environment, so each tracker writes in its own folder of output_dir; W&B quiet."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, monkeypatch_module) -> Path:
    """A tiny seq-cls run evaluated every 3 of its 6 steps, reporting to every installed tracker."""
    if not INSTALLED:
        pytest.skip("no tracker package is installed (pip install 'deltatune[tracking]')")
    tmp_path = tmp_path_factory.mktemp("tracked")
    tracker_defaults(monkeypatch_module)
    config = task_config(tmp_path, "seq-cls", eval_every=3, report_to=INSTALLED)
    assert main(["train", str(config), "--quiet"]) == 0
    return tmp_path / "out"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def history(output_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.json row that has `key`."""
    rows = json.loads((output_dir / "metrics.json").read_text())["history"]
    return [(row["step"], row[key]) for row in rows if key in row]


def as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def test_tensorboard_events_hold_the_loss_rate_and_eval_metrics_of_metrics_json(tracked_run: Path) -> None:
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_folder,) = (tracked_run / "runs").iterdir()
    events = EventAccumulator(str(run_folder))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(event.step, event.value) for event in events.Scalars(tag)]

    for key, tag in TRACKED_NAMES.items():
        assert scalars(tag) == [(step, as_float32(value)) for step, value in history(tracked_run, key)]
    assert [step for step, _ in scalars("eval/accuracy")] == [3, 6]  # the eval rows are there
    assert [step for step, _ in scalars("train/tokens_per_second")] == list(range(1, 7))
    assert all(rate > 0 for _, rate in scalars("train/tokens_per_second"))
    (config_text,) = events.Tensors("config/text_summary")
    assert '"adapter.r": 4' in config_text.tensor_proto.string_val[0].decode()


def test_mlflow_run_holds_every_metrics_json_value_and_the_config_as_parameters(tracked_run: Path) -> None:
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "out"

    def metric(name: str) -> list[tuple[int, float]]:
        return sorted((entry.step, entry.value) for entry in client.get_metric_history(run.info.run_id, name))

    for key, name in TRACKED_NAMES.items():
        assert metric(name) == history(tracked_run, key)
    assert run.data.params["adapter.r"] == "4" and run.data.params["learning_rate"] == "0.02"
    assert run.data.params["task"] == "seq-cls"


def wandb_records(path: Path) -> list:
    """The protocol-buffer records of a W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB log blocks of 32 KiB, each record cut into chunks (checksum, length, type: 1 whole, 2 first,
    3 middle, 4 last) that never cross a block."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, chunks, records = 7, [], []
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if room < 7 or (length == 0 and kind == 0):
            position += room
            continue
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_wandb_offline_run_folder_holds_the_history_and_config(tracked_run: Path) -> None:
    needs("wandb")
    (run_folder,) = (tracked_run / "wandb").glob("offline-run-*")
    (run_file,) = run_folder.glob("run-*.wandb")
    records = wandb_records(run_file)
    logged: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                logged.setdefault(name, []).append((record.history.step.num, json.loads(item.value_json)))
    for key, name in TRACKED_NAMES.items():
        assert logged[name] == history(tracked_run, key)
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    config = {item.key: item.value_json for item in run.config.update}
    assert json.loads(config["adapter.r"]) == 4 and run.display_name == "out"


def test_a_tracker_whose_package_is_missing_stops_the_run_before_training_naming_the_extra(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", tracking.TrackerSpec("mlflow_log", "no_such_tracker_package"))
    config = task_config(tmp_path, "seq-cls", report_to="mlflow")
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deltatune: ") and "\n" not in error and "no_such_tracker_package is not installed" in error
    assert "pip install 'deltatune[tracking]'" in error
    assert not (tmp_path / "out" / "adapter").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_an_unknown_tracker_name_is_refused_with_the_close_name(tmp_path) -> None:
    settings = yaml.safe_load(task_config(tmp_path, "seq-cls").read_text())
    with pytest.raises(ConfigError, match="unknown report_to 'tensorbord'; did you mean 'tensorboard'"):
        TrainConfig.from_dict({**settings, "report_to": ["mlflow", "tensorbord"]})
    with pytest.raises(ConfigError, match="report_to must be"):
        TrainConfig.from_dict({**settings, "report_to": 3})


def test_report_to_none_and_repeats_name_no_tracker_twice() -> None:
    assert tracking.tracker_names("none") == [] and tracking.tracker_names(["none"]) == []
    assert tracking.tracker_names(["mlflow", "wandb", "mlflow"]) == ["mlflow", "wandb"]


def test_report_to_is_not_part_of_the_run_identity(tmp_path) -> None:
    settings = yaml.safe_load(task_config(tmp_path, "seq-cls").read_text())
    quiet, tracked = (TrainConfig.from_dict({**settings, "report_to": value}) for value in ("none", ["wandb"]))
    assert run_record(quiet, [], 1)["fingerprint"] == run_record(tracked, [], 1)["fingerprint"]


def test_a_failed_run_ends_its_mlflow_run_as_failed(tmp_path, monkeypatch) -> None:
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    from deltatune.errors import TrainingDivergedError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", report_to="mlflow", learning_rate=1e30))
    with pytest.raises(TrainingDivergedError):
        train(config, progress=False)
    client = MlflowClient(tracking_uri=(tmp_path / "out" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    assert run.info.status == "FAILED"


def test_mlflow_follows_mlflow_tracking_uri_when_the_environment_sets_it(tmp_path, monkeypatch) -> None:
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    elsewhere = (tmp_path / "server-store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    with tracking.reporting("mlflow", tmp_path / "out") as trackers:
        trackers.start({"adapter": {"r": 4}})
        trackers.log({"step": 1, "loss": 0.5})
    client = MlflowClient(tracking_uri=elsewhere)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert [(entry.step, entry.value) for entry in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (1, 0.5)
    ]
    assert not (tmp_path / "out" / "mlruns").exists()


def test_wandb_follows_wandb_mode_when_the_environment_sets_it(tmp_path, monkeypatch) -> None:
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with tracking.reporting("wandb", tmp_path / "out") as trackers:
        trackers.start({"adapter": {"r": 4}})
        trackers.log({"step": 1, "loss": 0.5})
    assert not list((tmp_path / "out").glob("wandb/offline-run-*"))


def test_a_tracker_that_cannot_start_is_one_line_naming_it(tmp_path, monkeypatch) -> None:
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(tracking.TrackerStartError, match=r"^report_to wandb: wandb could not start a run \(") as error:
        with tracking.reporting("wandb", tmp_path) as trackers:
            trackers.start({})
    assert "\n" not in str(error.value)


def test_a_resume_may_add_a_tracker_which_then_holds_the_resumed_steps(tmp_path) -> None:
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = task_config(tmp_path, "seq-cls", save_every=3, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0 and not (tmp_path / "out" / "runs").exists()
    step_3 = checkpoint_folder(tmp_path / "out", 3)
    assert main(["train", str(config), "--quiet", "--resume", str(step_3), "report_to=tensorboard"]) == 0
    (run_folder,) = (tmp_path / "out" / "runs").iterdir()
    events = EventAccumulator(str(run_folder))
    events.Reload()
    resumed = [
        (row["step"], as_float32(row["loss"]))
        for row in json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    ]
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == resumed[3:]


def _mlflow_store(tmp_path: Path, monkeypatch) -> None:
    needs("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def tracker_warnings(caplog) -> list[str]:
    """The warnings about trackers (a busy machine's thread warning may come too)."""
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("report_to ")]


def _the_mlflow_run(output_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(output_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    return client, run


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning_and_the_run_finishes_and_saves(
    tmp_path, monkeypatch, caplog
) -> None:
    """A tracker only mirrors metrics.json: its server failing at the third row (a 503, a full disk) costs that
    tracker, never the run."""
    _mlflow_store(tmp_path, monkeypatch)
    import mlflow
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    metric_calls = []

    def failing_third(self, run_id, metrics=(), **kwargs):
        if metrics:
            metric_calls.append(len(metrics))
            if len(metric_calls) == 3:
                raise mlflow.exceptions.MlflowException("tracking server returned 503")
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing_third)
    config = task_config(tmp_path, "seq-cls", report_to="mlflow", eval_file=None)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert main(["train", str(config), "--quiet"]) == 0
    output_dir = tmp_path / "out"
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [step for step, _ in history(output_dir, "loss")] == [1, 2, 3, 4, 5, 6]
    assert len(metric_calls) == 3  # nothing more was sent to the tracker that failed
    (warning,) = tracker_warnings(caplog)
    assert warning.startswith("report_to mlflow: mlflow could not record step 3 (tracking server returned 503)")
    assert "metrics.json" in warning and "\n" not in warning
    client, run = _the_mlflow_run(output_dir)
    assert [entry.step for entry in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.info.status == "FAILED"  # it holds part of the run


def test_a_tracker_that_cannot_close_leaves_a_finished_run_finished(tmp_path, monkeypatch, caplog) -> None:
    _mlflow_store(tmp_path, monkeypatch)
    import mlflow
    from mlflow.tracking import MlflowClient

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("tracking server returned 503")

    monkeypatch.setattr(MlflowClient, "set_terminated", refuse)
    config = task_config(tmp_path, "seq-cls", report_to="mlflow", eval_file=None)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert main(["train", str(config), "--quiet"]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    (warning,) = tracker_warnings(caplog)
    assert warning.startswith("report_to mlflow: ") and "tracking server returned 503" in warning


def test_a_tracker_that_cannot_close_after_a_failed_run_leaves_the_run_error_to_be_seen(tmp_path, monkeypatch) -> None:
    _mlflow_store(tmp_path, monkeypatch)
    import mlflow
    from mlflow.tracking import MlflowClient

    from deltatune.errors import TrainingDivergedError

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("tracking server returned 503")

    monkeypatch.setattr(MlflowClient, "set_terminated", refuse)
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", report_to="mlflow", learning_rate=1e30))
    with pytest.raises(TrainingDivergedError):
        train(config, progress=False)
