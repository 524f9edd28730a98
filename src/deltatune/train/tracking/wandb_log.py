"""Weights & Biases: offline by default, the run kept in `OUTPUT_DIR/wandb/offline-run-*` (upload it
later with `wandb sync`), unless the environment sets `WANDB_MODE` (online, offline, disabled); the
project is `WANDB_PROJECT` or "deltatune", the folder `WANDB_DIR` or the output folder, the run
named after the output folder; the config as the run's config. W&B writes in `wandb/` under that folder: a link at
`OUTPUT_DIR/wandb` is refused before the model loads (`outputs.check_no_links`), whatever `WANDB_DIR` says; to
keep W&B's files elsewhere, set `WANDB_DIR`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "deltatune"
WANDB_FOLDER = "wandb"
"""The folder W&B writes in, under the folder it is given."""


class WandbTracker:
    def __init__(self, output_dir: Path, run_name: str, hyperparameters: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name,
            dir=os.environ.get("WANDB_DIR") or str(output_dir),
            mode=os.environ.get("WANDB_MODE") or "offline",  # read at each run: wandb reads it once a process
            config=hyperparameters,
            reinit="create_new",
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def open_tracker(output_dir: Path, run_name: str, hyperparameters: dict[str, Any]) -> WandbTracker:
    return WandbTracker(output_dir, run_name, hyperparameters)
