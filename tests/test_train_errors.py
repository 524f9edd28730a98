"""Bad input to the command ends with one clear line on stderr (no traceback) and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deltatune.train.cli import main
from training_fixtures import task_config


def malformed_line(tmp_path) -> list[str]:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "red cat", "completion": "the cat"}\n{"prompt": "blue dog", "completion": \n', encoding="utf-8"
    )
    return [f"train_file={data}"]


def missing_field(tmp_path) -> list[str]:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "red cat", "completion": "the cat"}\n{"prompt": "blue dog", "answer": "dog"}\n', encoding="utf-8"
    )
    return [f"train_file={data}"]


CASES = {
    "malformed-json": (malformed_line, "bad.jsonl line 2: not valid JSON"),
    "missing-field": (missing_field, "bad.jsonl line 2: field 'completion' is missing"),
    "missing-file": (lambda tmp: [f"train_file={tmp / 'nowhere.jsonl'}"], "nowhere.jsonl does not exist"),
    "missing-model": (lambda tmp: [f"model={tmp / 'no-model'}"], "is not a local model folder (no config.json there)"),
    "unknown-method": (lambda tmp: ["adapter.method=lorra"], "unknown method 'lorra'. Did you mean 'lora'"),
    "unknown-method-field": (lambda tmp: ["adapter.rank=4"], "LoraConfig has no field 'rank'"),
    "unknown-task": (lambda tmp: ["task=classify"], "unknown task 'classify'"),
    "bad-override": (lambda tmp: ["learning_rate"], "bad override 'learning_rate': write key=value"),
    "unknown-key": (
        lambda tmp: ["lerning_rate=1e-3"],
        "unknown config key 'lerning_rate'; did you mean 'learning_rate'",
    ),
    "bad-number": (lambda tmp: ["learning_rate=fast"], "learning_rate must be a number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_with_one_clear_line(case: str, tmp_path, capsys) -> None:
    make_overrides, message = CASES[case]
    config, overrides = task_config(tmp_path, "causal-lm"), make_overrides(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltatune: ") and message in err, err


def test_missing_config_file_from_the_shell_exits_non_zero_without_traceback(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.train.cli", "train", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"deltatune: config file {tmp_path / 'none.yaml'} does not exist"]
