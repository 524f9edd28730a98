"""A training run writes only inside its output_dir and never through a link: a run entry (`adapter`,
`checkpoints`, `metrics.json`, `training.png`, or anything inside them), the run record, TensorBoard's `runs` or
MLflow's `mlruns` folder (or anything inside them) or W&B's `wandb` folder that is a symlink, dangling or not, is
refused in one line naming it, before the model loads, and nothing outside output_dir changes; a file there that
is a hard link to a file elsewhere is replaced, never written into."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deltatune.train.cli import main
from test_train_tracking import needs, tracker_defaults
from training_fixtures import task_config

SETTINGS = {"max_steps": 3, "save_every": 1, "eval_file": None}


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (links not followed) → its bytes, its link target, or None for a folder."""
    found: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = os.fsencode(os.readlink(path))
        else:
            found[str(path.relative_to(folder))] = None if path.is_dir() else path.read_bytes()
    return found


def outside(root: Path) -> dict[str, bytes | None]:
    """What lies in `root` outside its run folder `out` (the config, the data, a user's files)."""
    return {name: value for name, value in tree(root).items() if not name.startswith("out")}


def users_files(root: Path) -> None:
    """A user's own file and an empty folder of someone else's, outside the run's output_dir."""
    (root / "home").mkdir()
    (root / "home" / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n", encoding="utf-8")
    (root / "elsewhere").mkdir()


def refusal(capsys: pytest.CaptureFixture) -> str:
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("deltatune: ") and error.count("\n") == 1, error
    return error


LINKS = {
    "record-to-a-users-file": (".deltatune-run.json", "home/.bashrc"),
    "dangling-adapter": ("adapter", "elsewhere/adapter"),
    "dangling-plot": ("training.png", "elsewhere/training.png"),
    "dangling-checkpoints": ("checkpoints", "elsewhere/checkpoints"),
    "metrics-to-a-users-file": ("metrics.json", "home/.bashrc"),
    "adapter-to-a-folder": ("adapter", "elsewhere"),
    "tensorboard-runs-to-a-folder": ("runs", "elsewhere"),
    "mlflow-mlruns-to-a-folder": ("mlruns", "elsewhere"),
    "an-mlflow-experiment-to-a-folder": ("mlruns/0", "elsewhere"),
    "wandb-folder-to-a-folder": ("wandb", "elsewhere"),
}
"""Entry of output_dir → where its symlink points (in the test's folder)."""


@pytest.mark.parametrize("entry, target", list(LINKS.values()), ids=list(LINKS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_run_never_writes_through_a_link_in_its_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture, entry: str, target: str, overwrite: bool
) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    users_files(tmp_path)
    out = tmp_path / "out"
    (out / entry).parent.mkdir(parents=True)
    (out / entry).symlink_to(tmp_path / target)
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", f"overwrite_output_dir={str(overwrite).lower()}"]) == 2
    error = refusal(capsys)
    assert f"{out / entry} is a link" in error and "a run writes only inside output_dir" in error, error
    assert tree(tmp_path) == before


TRACKER_FOLDERS = {"mlflow": "mlruns", "wandb": "wandb"}
"""Tracker → the folder it writes in output_dir when the environment names no other place for it."""


@pytest.mark.transformers_independent
@pytest.mark.parametrize("tracker", list(TRACKER_FOLDERS))
def test_a_tracker_never_writes_through_a_link_at_its_folder_in_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    """Without MLFLOW_TRACKING_URI or WANDB_DIR the tracker writes in output_dir: a link there would take its
    files elsewhere."""
    needs(tracker)
    tracker_defaults(monkeypatch)
    config = task_config(tmp_path, "seq-cls", report_to=tracker, **SETTINGS)
    users_files(tmp_path)
    link = tmp_path / "out" / TRACKER_FOLDERS[tracker]
    link.parent.mkdir()
    link.symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = refusal(capsys)
    assert f"{link} is a link" in error, error
    assert tree(tmp_path) == before


@pytest.mark.transformers_independent
def test_a_run_again_beside_the_links_wandb_keeps_in_its_folder_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B keeps links of its own in `wandb/` (`latest-run`, `debug.log`), each put in the place of what was
    there, never written through: only the folder itself is refused as a link."""
    needs("wandb")
    tracker_defaults(monkeypatch)
    config = task_config(tmp_path, "seq-cls", report_to="wandb", **SETTINGS)
    wandb_folder = tmp_path / "out" / "wandb"
    assert main(["train", str(config), "--quiet"]) == 0
    assert any(path.is_symlink() for path in wandb_folder.iterdir())
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true"]) == 0
    assert len(list(wandb_folder.glob("offline-run-*"))) == 2


@pytest.mark.parametrize(
    "entry",
    ["adapter", "checkpoints/step-000002", "checkpoints/step-000002/adapter"],
    ids=["adapter", "a-later-checkpoint", "a-later-checkpoints-adapter"],
)
def test_a_resumed_run_never_writes_through_a_link_in_its_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture, entry: str
) -> None:
    """What a resumed run writes again (its adapter, the checkpoints after the one it resumes) is refused as a
    link to a folder elsewhere, before the model loads."""
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    users_files(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.move(out / entry, tmp_path / "elsewhere" / "moved")
    (out / entry).symlink_to(tmp_path / "elsewhere" / "moved")
    before = tree(tmp_path)
    capsys.readouterr()
    resume = str(out / "checkpoints" / "step-000001")
    assert main(["train", str(config), "--quiet", "--resume", resume]) == 2
    error = refusal(capsys)
    assert f"{out / entry} is a link" in error, error
    assert tree(tmp_path) == before


def test_a_fresh_run_replaces_a_hard_linked_record_and_leaves_the_file_it_shares_as_it_was(tmp_path: Path) -> None:
    """A hard link cannot be told from a file of the run's own: the run puts a new file at that name, so the
    user's file that shares its contents stays as it was."""
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    users_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.link(tmp_path / "home" / ".bashrc", out / ".deltatune-run.json")
    before = outside(tmp_path)
    assert main(["train", str(config), "--quiet"]) == 0
    assert outside(tmp_path) == before
    assert b"deltatune" in (out / ".deltatune-run.json").read_bytes()


def test_a_resumed_run_replaces_a_hard_linked_plot_and_leaves_the_file_it_shares_as_it_was(tmp_path: Path) -> None:
    config = task_config(tmp_path, "seq-cls", **SETTINGS)
    users_files(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(out / "adapter")
    (out / "training.png").unlink()
    os.link(tmp_path / "home" / ".bashrc", out / "training.png")
    before = outside(tmp_path)
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
    assert outside(tmp_path) == before
    assert (out / "training.png").read_bytes().startswith(b"\x89PNG")
