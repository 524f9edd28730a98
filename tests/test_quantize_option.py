"""`quantize:` in the trainer and the command line: `deltatune train cfg.yaml quantize=NAME` trains on a
base loaded quantized (a 64-wide Llama: bitsandbytes quantizes in blocks of 64), `deltatune eval` with
the same config reports what the run's final evaluation reported, `--resume` continues bit-exactly and
refuses a checkpoint written with another `quantize`, the adapter is the same files as on the float32
base (each loads on the other), and a missing backend is one line naming the package, before any data
or model is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.base_fingerprint import differing_modules
from deltatune.train import loop, quantize
from deltatune.train.cli import main
from test_quantized import PACKAGES, installed
from training_fixtures import model_folder, task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

SETTINGS = {"arch": "llama-64", "batch_size": 8, "max_steps": 6, "learning_rate": 0.01}


def option(name: str) -> pytest.param:
    package = PACKAGES[name]
    reason = f"{package} is not installed (pip install deltatune[quantized])"
    return pytest.param(name, marks=pytest.mark.skipif(not installed(package), reason=reason))


NAMES = [option(name) for name, row in quantize.QUANTIZE_OPTIONS.items() if row.make is not None]
"""The names transformers quantizes a model folder with at load (gguf reads a GGUF file: test_gguf_base.py)."""


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))


def losses(output_dir: Path) -> list[float]:
    return [entry["loss"] for entry in metrics(output_dir)["history"] if "loss" in entry]


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_train_on_a_quantized_base_then_eval_with_the_same_config(name: str, tmp_path: Path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", quantize=name, **SETTINGS)
    assert main(["train", str(config), "--quiet"]) == 0
    trained = losses(tmp_path / "out")
    assert len(trained) == 6 and trained[-1] < trained[0] - 0.05
    tensors = adapter_tensors(tmp_path / "out")
    assert tensors and all(tensor.dtype == torch.float32 for tensor in tensors.values())
    capsys.readouterr()
    assert main(["eval", str(config)]) == 0
    reported = json.loads(capsys.readouterr().out)
    final = metrics(tmp_path / "out")["eval"]
    assert reported.keys() == final.keys()
    assert reported == pytest.approx(final, abs=1e-4)


def interrupted(tmp_path: Path, **settings) -> tuple[Path, Path]:
    """An nf4 run with a checkpoint at step 3 and its output folder cut back to that checkpoint."""
    config = task_config(tmp_path, "causal-lm", quantize="nf4", save_every=3, eval_file=None, **SETTINGS, **settings)
    out = tmp_path / "cut"
    assert main(["train", str(config), f"output_dir={out}", "--quiet"]) == 0
    shutil.rmtree(out / "checkpoints" / "step-000006", ignore_errors=True)
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    return config, out


@pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
def test_resume_on_an_nf4_base_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    config, cut = interrupted(tmp_path)
    whole = tmp_path / "whole"
    assert main(["train", str(config), f"output_dir={whole}", "--quiet"]) == 0
    assert main(["train", str(config), f"output_dir={cut}", "--quiet", "--resume"]) == 0
    expected, resumed = adapter_tensors(whole), adapter_tensors(cut)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert metrics(whole)["history"] == metrics(cut)["history"]


@pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
@pytest.mark.parametrize("other", ["null", "fp4"])
def test_resume_with_another_quantize_is_refused_naming_it(other: str, tmp_path: Path, capsys) -> None:
    config, cut = interrupted(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={cut}", f"quantize={other}", "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "other settings (quantize: " in err.strip().splitlines()[-1]
    assert (cut / "checkpoints" / "step-000003").is_dir()


@pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
def test_an_adapter_trained_on_nf4_is_the_same_files_and_loads_on_the_float32_base_and_back(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", quantize="nf4", eval_file=None, **SETTINGS)
    nf4, fp32 = tmp_path / "nf4", tmp_path / "fp32"
    assert main(["train", str(config), f"output_dir={nf4}", "--quiet"]) == 0
    assert main(["train", str(config), f"output_dir={fp32}", "quantize=null", "--quiet"]) == 0
    assert sorted(path.name for path in (nf4 / "adapter").iterdir()) == sorted(
        path.name for path in (fp32 / "adapter").iterdir()
    )
    from_nf4, from_fp32 = adapter_tensors(nf4), adapter_tensors(fp32)
    assert {key: (t.shape, t.dtype) for key, t in from_nf4.items()} == {
        key: (t.shape, t.dtype) for key, t in from_fp32.items()
    }
    saved = json.loads((nf4 / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    saved_fp32 = json.loads((fp32 / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    # the base's print: names and shapes only on the 4-bit layers, which match the float base's
    assert differing_modules(saved.pop("base_fingerprint"), saved_fp32.pop("base_fingerprint")) == []
    assert saved == saved_fp32

    folder = tmp_path / "tiny-causal-lm-llama-64"
    batch = {"input_ids": torch.tensor([[1, 20, 30, 40, 50]])}
    bases = {
        "fp32": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        "nf4": lambda: AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=quantize.quantization_config("nf4"), device_map="cpu"
        ),
    }
    for base, trained, tensors in (("fp32", nf4, from_nf4), ("nf4", fp32, from_fp32)):
        model = bases[base]().train()  # training mode: bitsandbytes' dequantizing path (see test_quantized)
        with torch.no_grad():
            plain = model(**batch).logits
        loaded = deltatune.load(model, str(trained / "adapter"))
        with torch.no_grad():
            assert (loaded(**batch).logits - plain).abs().max() > 1e-4, base
        loaded.save(str(tmp_path / f"again-on-{base}"))
        again = load_file(str(tmp_path / f"again-on-{base}" / "adapter_model.safetensors"))
        assert again.keys() == tensors.keys() and all(torch.equal(again[key], tensors[key]) for key in tensors)


def refusing(*_args, **_kwargs):
    raise AssertionError("read before the missing backend was reported")


@pytest.mark.parametrize("name", list(quantize.QUANTIZE_OPTIONS))
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_missing_backend_is_one_line_naming_it_before_anything_loads(
    name: str, command: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    config = task_config(tmp_path, "causal-lm", quantize=name, **SETTINGS)
    package = quantize.QUANTIZE_OPTIONS[name]
    monkeypatch.setattr(quantize, "_installed", lambda module: module != package.module)
    for reader in ("read_records", "load_tokenizer", "load_model"):
        monkeypatch.setattr(loop, reader, refusing)
    capsys.readouterr()
    assert main([command, str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"needs the {package.install} package" in err and f"pip install {package.install}" in err


@pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
def test_the_demo_runs_on_an_nf4_base_and_says_so(tmp_path: Path, capsys) -> None:
    model = model_folder(tmp_path, "causal-lm", arch="llama-64")
    out = tmp_path / "demo"
    command = ["demo", "--model", str(model), "--out", str(out), "--steps", "2", "--examples", "4", "quantize=nf4"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "(quantized nf4 base)" in printed and "base weights: quantized nf4" in printed
    report = metrics(out)
    assert report["quantize"] == "nf4" and 0.0 <= report["after"] <= 1.0


@pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
def test_gradient_checkpointing_on_an_nf4_base_trains_the_same_adapter(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", quantize="nf4", eval_file=None, **SETTINGS)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert main(["train", str(config), f"output_dir={plain}", "--quiet"]) == 0
    assert main(["train", str(config), f"output_dir={checkpointed}", "gradient_checkpointing=true", "--quiet"]) == 0
    assert losses(checkpointed)[-1] < losses(checkpointed)[0] - 0.05
    expected, tensors = adapter_tensors(plain), adapter_tensors(checkpointed)
    assert expected.keys() == tensors.keys()
    for key in expected:
        torch.testing.assert_close(tensors[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from file `path` (Linux: /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path:
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("name", NAMES)
def test_a_quantized_load_keeps_no_float_tensor_in_the_mapped_checkpoint(name: str, tmp_path: Path) -> None:
    """The tensors left unquantized are the model's own memory, not views of the checkpoint file (which
    would keep every page of it read while quantizing resident)."""
    from deltatune.train.models import load_model

    folder = model_folder(tmp_path, "causal-lm", arch="llama-64")
    model = load_model(str(folder), quantize=name)
    ranges = mapped_ranges((folder / "model.safetensors").resolve())
    floating = [tensor for tensor in [*model.parameters(), *model.buffers()] if type(tensor.data) is torch.Tensor]
    floating = [tensor for tensor in floating if tensor.is_floating_point()]
    assert floating
    inside = [tensor.shape for tensor in floating if any(s <= tensor.data_ptr() < e for s, e in ranges)]
    assert not inside
