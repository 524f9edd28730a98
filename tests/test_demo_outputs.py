"""`deltatune demo --out DIR` follows the trainer's output rules: a folder holding another run's work or a
user's files is refused (one line, before anything is written) unless `--overwrite`, which replaces only what
a deltatune run or demo wrote there; and the demo never writes over its `--data` input."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from deltatune.train.cli import main
from test_train_outputs_links import refusal, tree, users_files
from training_fixtures import model_folder, records, task_config, write_jsonl


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (helper entries of saves left out) → its content's digest."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".deltatune")
    }


def demo(model: Path, out: Path, *extra: str) -> int:
    return main(["demo", "--model", str(model), "--out", str(out), "--steps", "1", "--examples", "2", *extra])


def earlier_training_run(tmp_path: Path, out: Path) -> None:
    config = task_config(tmp_path, "causal-lm", output_dir=out, eval_file=None, max_steps=1)
    assert main(["train", str(config), "--quiet"]) == 0


def user_file(name: str, content: bytes) -> Callable[[Path, Path], None]:
    def write(tmp_path: Path, out: Path) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)

    return write


REFUSED = {
    "an-earlier-training-run": (earlier_training_run, "already holds adapter"),
    "the-users-modelfile": (user_file("Modelfile", b"FROM /models/mine.gguf\n"), "Modelfile"),
    "the-users-adapter-gguf": (user_file("adapter.gguf", b"my own export"), "adapter.gguf"),
    "the-users-data-file": (user_file("data/train.jsonl", b'{"prompt": "a", "completion": "b"}\n'), "data/train.jsonl"),
}


REFUSALS = [(holding, (), "--overwrite") for holding in REFUSED] + [
    (holding, ("--overwrite",), "no deltatune") for holding in REFUSED if holding != "an-earlier-training-run"
]
"""(what --out holds, the demo's flags, what its refusal says): --overwrite still refuses files no deltatune
run wrote (an earlier training run's work it replaces)."""


@pytest.mark.parametrize("holding, flags, said", REFUSALS)
def test_demo_refuses_an_out_folder_holding_other_work_and_writes_nothing(
    holding: str, flags: tuple[str, ...], said: str, tmp_path, capsys
) -> None:
    model, out = model_folder(tmp_path, "causal-lm"), tmp_path / "project"
    out.mkdir()
    make, named = REFUSED[holding]
    make(tmp_path, out)
    before = folder_digest(out)
    capsys.readouterr()
    assert demo(model, out, *flags) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("deltatune: ") and named in last and said in last, last
    assert folder_digest(out) == before


DEMO_LINKS = {
    "data-folder-to-a-folder": ("data", "elsewhere"),
    "dangling-data-folder": ("data", "elsewhere/data"),
    "config-to-a-users-file": ("demo.yaml", "home/.bashrc"),
    "dangling-gguf": ("adapter.gguf", "elsewhere/adapter.gguf"),
    "record-to-a-users-file": (".deltatune-demo.json", "home/.bashrc"),
}
"""Entry of --out that the demo writes → where its symlink points (in the test's folder)."""


@pytest.mark.parametrize("entry, target", list(DEMO_LINKS.values()), ids=list(DEMO_LINKS))
@pytest.mark.parametrize("flags", [(), ("--overwrite",)], ids=["fresh", "overwrite"])
def test_demo_never_writes_through_a_link_in_its_out_folder(
    entry: str, target: str, flags: tuple[str, ...], tmp_path, capsys
) -> None:
    """The demo writes only inside --out and never through a link: a symlink at its data folder or one of its own
    files is refused in one line naming it, before anything is written, whatever --overwrite says."""
    model, out = model_folder(tmp_path, "causal-lm"), tmp_path / "project"
    users_files(tmp_path)
    out.mkdir()
    (out / entry).symlink_to(tmp_path / target)
    before = tree(tmp_path)
    capsys.readouterr()
    assert demo(model, out, *flags) == 2
    error = refusal(capsys)
    assert f"{out / entry} is a link" in error, error
    assert tree(tmp_path) == before


def test_demo_never_writes_over_its_data_input(tmp_path, capsys) -> None:
    model, out = model_folder(tmp_path, "causal-lm"), tmp_path / "project"
    (out / "data").mkdir(parents=True)
    data = write_jsonl(out / "data" / "train.jsonl", records("causal-lm", 12))
    before = folder_digest(out)
    for overwrite in ([], ["--overwrite"]):
        capsys.readouterr()
        assert demo(model, out, "--data", str(data), *overwrite) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("deltatune: ") and str(data) in last and "--data" in last, last
        assert folder_digest(out) == before


def test_demo_overwrite_replaces_an_earlier_run_and_keeps_the_users_files(tmp_path) -> None:
    """An earlier training run, then a LoRA demo (with its llama.cpp file), the same demo again, then a BitFit demo
    (none): each replaces the run before it whole (no stale adapter.gguf), and the user's note stays. A training
    run's work is replaced only when told; a demo's own (recorded, unchanged) is replaced by the next demo, so that
    `make demo` runs twice."""
    model, out = model_folder(tmp_path, "causal-lm"), tmp_path / "project"
    earlier_training_run(tmp_path, out)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert demo(model, out, "--overwrite") == 0
    if importlib.util.find_spec("gguf") is not None:
        assert (out / "adapter.gguf").is_file() and (out / "Modelfile").is_file()
    assert demo(model, out) == 0
    assert demo(model, out, "--overwrite", "--method", "bitfit") == 0
    assert not (out / "adapter.gguf").exists() and not (out / "Modelfile").exists()
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "data" / "eval.jsonl").is_file()
