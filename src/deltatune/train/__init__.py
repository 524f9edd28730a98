"""Training: `deltatune.train.train(TrainConfig.from_yaml("run.yaml"))`, or `deltatune train run.yaml`.

Files: `tasks.py` (one row per task type), `config.py` (the YAML config), `data.py` (reading records),
`data_record.py` (one record), `encode.py` (records → tokens),
`models.py` / `smollm2.py` (loading, offline), `loop.py` (the loop),
`schedule.py` (data order and learning rate per step), `packing.py` / `length_groups.py` (batch layout),
`optimizer.py` (AdamW and LoRA+ groups), `step_hooks.py` (a method's per-step work: AdaLoRA's rank budget),
`sharding.py` (FSDP), `checkpoint.py` (`--resume`),
`distributed.py` (torchrun / accelerate), `predict.py` / `evaluate.py` /
`metrics.py`, `progress.py` (the training bar, timed on training alone), `threads.py` (CPU threads),
`report.py` (metrics.json and the plot), `tree.py` (the module tree of `deltatune inspect`), `demo.py`
(the main job), `cli.py`.
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig
from .data import DataError
from .loop import Run, TrainResult, prepare_run, train, train_run

__all__ = ["ConfigError", "DataError", "Run", "TrainConfig", "TrainResult", "prepare_run", "train", "train_run"]
