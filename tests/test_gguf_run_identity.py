"""The run identity names the weights a run loads: with `quantize: gguf`, a packaged model's GGUF file,
not the folder converted from it (which a `quantize: gguf` run never reads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.train import models  # noqa: E402
from deltatune.train.config import TrainConfig  # noqa: E402
from deltatune.train.fingerprint import run_record, weights_identity  # noqa: E402
from test_gguf_base import tiny_llama, write_gguf  # noqa: E402
from training_fixtures import task_config  # noqa: E402


def _identity(config_path: Path) -> str:
    return run_record(TrainConfig.from_yaml(config_path), [], 1)["fingerprint"]["base_model_weights"]


@pytest.mark.parametrize("quantize", ["gguf", None], ids=["gguf", "converted-folder"])
def test_a_packaged_models_identity_is_the_weights_the_run_loads(
    quantize: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = task_config(tmp_path, "causal-lm", quantize=quantize)
    folder = Path(TrainConfig.from_yaml(config_path).model)
    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_llama())
    monkeypatch.setitem(models.PACKAGED_MODELS, "tiny", lambda: folder)
    monkeypatch.setitem(models.PACKAGED_GGUF, "tiny", lambda: gguf_path)
    config_path = task_config(tmp_path, "causal-lm", model="tiny", quantize=quantize)
    loaded, other = (gguf_path, folder) if quantize == "gguf" else (folder, gguf_path)
    before = _identity(config_path)
    assert before == weights_identity(loaded) != weights_identity(other)
    os.utime(next(path for path in [other, *other.glob("*.safetensors")] if path.is_file()), ns=(1, 1))
    assert _identity(config_path) == before  # the weights the run does not load do not count
    os.utime(next(path for path in [loaded, *loaded.glob("*.safetensors")] if path.is_file()), ns=(1, 1))
    assert _identity(config_path) != before
