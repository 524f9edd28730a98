"""`deltatune show` tells the folders apart as `deltatune.load` does: AdapterHub's adapter and fusion
folders are named as AdapterHub's, with their method, tensors and config (the folders are written here
in AdapterHub's layout, as `save_adapter` / `save_adapter_fusion` leave them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltatune.train.cli import main

pytestmark = pytest.mark.transformers_independent  # folders written and read here: file formats only

BOTTLENECK = {
    "architecture": "bottleneck",
    "mh_adapter": False,
    "output_adapter": True,
    "reduction_factor": 16,
    "non_linearity": "relu",
}
TENSORS = {
    "bert.encoder.layer.0.output.adapters.task.adapter_down.0.weight": torch.zeros(2, 32),
    "bert.encoder.layer.0.output.adapters.task.adapter_up.weight": torch.zeros(32, 2),
}


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("weights", ["adapter.safetensors", "pytorch_adapter.bin"])
def test_show_names_an_adapterhub_adapter_folder_as_adapterhub_with_its_method(
    weights: str, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"config": BOTTLENECK, "name": "task", "model_type": "bert", "hidden_size": 32, "version": "1.0.0"})
    )
    write_weights(folder / weights, TENSORS)
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "adapterhub adapter, method bottleneck" in out and "2 tensors, 128 parameters" in out
    assert '"reduction_factor": 16' in out


def test_show_describes_an_adapterhub_fusion_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "fusion"
    folder.mkdir()
    config = {"key": True, "query": True, "value": True, "dropout_prob": 0.1}
    (folder / "adapter_fusion_config.json").write_text(
        json.dumps({"adapter_names": ["first", "second"], "config": config, "name": "first,second"})
    )
    query = "bert.encoder.layer.0.output.adapter_fusion_layer.first,second.query.weight"
    write_weights(folder / "model_adapter_fusion.safetensors", {query: torch.zeros(32, 32)})
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "adapterhub adapter, method fusion" in out and "1 tensors, 1,024 parameters" in out
    assert '"first"' in out and '"second"' in out
