"""TensorBoard: scalars in `OUTPUT_DIR/runs/<start time>/`, one folder per run (as transformers'
Trainer), written by torch's `SummaryWriter`; the config as hyperparameters (the HParams tab) and as
JSON text (the Text tab). View with `tensorboard --logdir OUTPUT_DIR/runs`. A link at `runs`, or inside it, is
refused before the model loads (`outputs.check_no_links`): a run never writes outside its output_dir."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import scalar_settings

RUNS_FOLDER = "runs"
CONFIG_TAG = "config"


class TensorBoardTracker:
    def __init__(self, log_dir: Path, hyperparameters: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(log_dir))
        for summary in hparams(scalar_settings(hyperparameters), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text(CONFIG_TAG, f"```json\n{json.dumps(hyperparameters, indent=2, default=str)}\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


def open_tracker(output_dir: Path, run_name: str, hyperparameters: dict[str, Any]) -> TensorBoardTracker:
    return TensorBoardTracker(output_dir / RUNS_FOLDER / time.strftime("%Y%m%d-%H%M%S"), hyperparameters)
