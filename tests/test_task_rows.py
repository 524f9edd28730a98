"""A task is one row of the task table: a row added under a new name is encoded, trained and
evaluated by the trainer with nothing registered anywhere else, and judged by its row's metrics."""

from __future__ import annotations

import dataclasses

from deltatune.train.config import TrainConfig
from deltatune.train.loop import prepare_run
from deltatune.train.tasks import TASKS
from training_fixtures import task_config


def test_a_row_alone_defines_a_task_the_trainer_encodes_and_evaluates(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(TASKS, "sentiment", dataclasses.replace(TASKS["seq-cls"], name="sentiment"))
    run = prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls"), ["task=sentiment"]))
    assert run.task is TASKS["sentiment"]
    assert {feature["labels"] for feature in run.train_features} == {0, 1}
    evaluation = run.evaluate()
    assert set(evaluation.metrics) == {"loss", "accuracy", "f1"}
    assert len(evaluation.predictions) == len(run.eval_features) and set(evaluation.references) == {0, 1}
