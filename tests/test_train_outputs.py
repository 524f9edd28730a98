"""`overwrite_output_dir` (and `deltatune compare --overwrite`) removes only what a deltatune run wrote: an
entry named like a run's output (`checkpoints/`, `adapter/`, `metrics.json`, `training.png`) that no run
recorded writing, or that holds what no run writes, is refused in one line naming it, before the model loads,
and everything in the folder stays as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.train.cli import main
from training_fixtures import task_config

SETTINGS = {"max_steps": 2, "save_every": 1, "eval_file": None}


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` → its bytes (None for a folder)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def refusal(capsys: pytest.CaptureFixture) -> str:
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("deltatune: ") and error.count("\n") == 1, error
    return error


def users_entries(out: Path) -> None:
    """A user's own folders named like a run's outputs: another tool's checkpoints and a notes folder."""
    (out / "checkpoints" / "my-pretraining").mkdir(parents=True)
    (out / "checkpoints" / "my-pretraining" / "model-step-90000.safetensors").write_bytes(b"\0" * 64)
    (out / "adapter").mkdir()
    (out / "adapter" / "notes.txt").write_text("my own notes", encoding="utf-8")


def test_overwrite_never_removes_entries_no_run_wrote(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    out = tmp_path / "out"
    users_entries(out)
    before = tree(out)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true"]) == 2
    error = refusal(capsys)
    assert "adapter/" in error and "checkpoints/" in error and "no deltatune run wrote" in error, error
    assert tree(out) == before


@pytest.mark.parametrize(
    "added, named",
    [
        ("checkpoints/my-pretraining/model.safetensors", "checkpoints/my-pretraining"),
        ("adapter/notes.txt", "adapter/"),
        ("checkpoints/step-000001/notes.txt", "checkpoints/step-000001"),
    ],
    ids=["folder-beside-the-checkpoints", "file-in-the-adapter", "file-in-a-checkpoint"],
)
def test_overwrite_never_removes_what_a_user_added_to_a_runs_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture, added: str, named: str
) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    out = tmp_path / "out"
    assert main(["train", str(config), "--quiet"]) == 0
    (out / added).parent.mkdir(parents=True, exist_ok=True)
    (out / added).write_text("mine", encoding="utf-8")
    before = tree(out)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true"]) == 2
    error = refusal(capsys)
    assert named in error and "no deltatune run wrote" in error, error
    assert tree(out) == before


def test_overwrite_replaces_a_runs_own_outputs_and_keeps_the_rest(tmp_path: Path) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    out = tmp_path / "out"
    assert main(["train", str(config), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true", "max_steps=1"]) == 0
    assert not (out / "checkpoints").exists()  # the old run's went; a run's last step saves none
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true"]) == 0  # and again


def test_compare_overwrite_refuses_a_method_folder_holding_entries_no_run_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", max_steps=2)
    out = tmp_path / "out"
    users_entries(out / "bitfit")
    before = tree(out)
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "lora,bitfit", "--overwrite", "--quiet"]) == 2
    error = refusal(capsys)
    assert "bitfit" in error and "checkpoints/" in error and "no deltatune run wrote" in error, error
    assert tree(out) == before  # refused before any method trained: no lora/ folder, no compare.md


@pytest.mark.parametrize("record", ["{", '{"written_by": "other", "entries": ["checkpoints"]}'], ids=["torn", "other"])
def test_a_run_record_that_is_not_a_runs_claims_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, record: str
) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    out = tmp_path / "out"
    assert main(["train", str(config), "--quiet"]) == 0
    (out / ".deltatune-run.json").write_text(record, encoding="utf-8")
    before = tree(out)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true"]) == 2
    assert "checkpoints/" in refusal(capsys)
    assert tree(out) == before
