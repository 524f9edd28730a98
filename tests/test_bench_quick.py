"""The benchmark suite's quick mode as a smoke test: every workload runs for every library and the
report is complete. Timings are printed by the suite, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="runs once, in the transformers 5 environment")
def test_quick_benchmark_runs_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    finished = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "quick"
    measured = set(report["results"]) | set(report["skipped"])
    assert {"train_dropout", "train_no_dropout", "train_tail_labels", "forward", "mixed", "add_and_merge", "houlsby", "prefix"} <= measured
    if (REPOSITORY / ".venv-transformers457" / "bin" / "python").exists():
        assert "houlsby" in report["results"], report["skipped"]
    assert all(row["value"] > 0 for row in report["targets"])
    assert "measure" in finished.stdout
