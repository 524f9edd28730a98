"""Rewriting an existing checkpoint step folder (a resumed run reaching that step again) never leaves
a folder that counts as complete while it mixes new files with the old trainer state."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.train.checkpoint as checkpoint
from tiny_models import build


class Killed(BaseException):
    """Stands in for a kill in the middle of the rewrite."""


def test_a_rewrite_of_a_step_folder_stopped_midway_leaves_it_incomplete(tmp_path, monkeypatch) -> None:
    delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"]))
    optimizer = torch.optim.SGD([p for p in delta_model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = checkpoint.checkpoint_folder(tmp_path, 3)
    checkpoint.save_checkpoint(folder, delta_model, optimizer, scheduler, checkpoint.TrainerState(step=3))
    assert checkpoint.complete_checkpoints(tmp_path) == [folder]

    def killed(*arguments: object) -> None:
        raise Killed

    monkeypatch.setattr(checkpoint, "write_files", killed)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(folder, delta_model, optimizer, scheduler, checkpoint.TrainerState(step=3))
    assert checkpoint.complete_checkpoints(tmp_path) == []
