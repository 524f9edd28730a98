"""The benchmark suite's quick mode as a smoke test: every workload runs for every library and the
report is complete. Timings are printed by the suite, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "bench"))

# `make bench` runs these scripts in the transformers 5 environment (AdapterHub's workload alone goes
# through a worker in the other one, which the first test starts), so the smoke test runs there only.
pytestmark = pytest.mark.transformers_independent


def test_quick_benchmark_runs_every_workload_starting_one_worker_only_for_the_other_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import run as bench

    started: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(command: list[str], *args, **kwargs):
        started.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", counting_run)
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "quick"
    measured = set(report["results"]) | set(report["skipped"])
    assert {
        "train_dropout",
        "train_no_dropout",
        "train_tail_labels",
        "forward",
        "mixed",
        "add_and_merge",
        "houlsby",
        "prefix",
        "train_nf4",
        "train_fp32_checkpoint",
    } <= measured
    other_environment = REPOSITORY / ".venv-transformers457" / "bin" / "python"
    if other_environment.exists():
        assert "houlsby" in report["results"], report["skipped"]
        assert set(report["results"]["houlsby"]) == {"deltatune", "adapterhub", "floor"}
    # Quick mode measures memory inside this process, where a tiny model may fit in pages it already holds.
    assert all(row["value"] >= 0 for row in report["targets"])
    timings = [row for row in report["targets"] if "memory" not in row["label"] and "peak" not in row["label"]]
    assert timings and all(row["value"] > 0 for row in timings)
    assert "measure" in capsys.readouterr().out
    # Each worker process imports torch, transformers and peft (~10 s of CPU); on a loaded 2-core machine
    # ~20 of them took minutes. Quick mode starts one only where another environment is needed: one for
    # all the runs of a measurement there (each library alone, then side by side).
    assert all(command[0] != sys.executable for command in started), [command[:3] for command in started]
    workers = [command for command in started if len(command) > 1 and Path(command[1]).name == "workloads.py"]
    assert len(workers) == (1 if other_environment.exists() else 0), [command[:3] for command in workers]


def test_quick_method_step_measures_every_method_beside_peft_and_the_floor(tmp_path: Path) -> None:
    import method_step

    out = tmp_path / "methods.json"
    report = method_step.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["methods"]) == set(method_step.METHODS)
    for row in report["methods"].values():
        assert row["logits_max_difference"] <= 1e-3
        assert all(row["training_step"][library]["seconds"] > 0 for library in ("peft", "deltatune", "floor"))
        assert row["ratio"] > 0 and row["floor_ratio"] > 0


def test_a_worker_reports_no_negative_peak_when_the_resident_counters_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux batches resident-page counts per thread, so the high-water mark read after a reset can sit a
    few pages below the resident size read just before: a peak added is never less than nothing."""
    import workloads

    readings = iter([1_000_000, 999_000, 998_000, 997_000])
    monkeypatch.setattr(workloads, "memory_after_imports", lambda: 1_000_000)
    monkeypatch.setattr(workloads, "peak_memory_bytes", lambda: next(readings))
    monkeypatch.setattr(workloads, "current_memory_bytes", lambda: 996_000)
    monkeypatch.setattr(workloads, "time_calls", lambda call, warmup, repeats: {"seconds": 1.0})
    monkeypatch.setitem(workloads.TIMED, "forward", lambda library, options: {"seconds": lambda: None})
    result = workloads.run("forward", ["deltatune"], {"warmup": 0, "repeats": 1})
    assert result["peak_with_load_bytes"] == 0
    assert result["step_peak_with_weights_bytes"] == 0
    assert result["resident_after_load_bytes"] == 0
