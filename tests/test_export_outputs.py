"""Where `deltatune export` writes: never over or into its inputs (the base file, the base or adapter folder),
whatever --overwrite says, and never over an existing OUT.gguf or Modelfile without --overwrite; a refusal
is one line, exit status 2, and leaves every file as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.gguf import load_gguf_model  # noqa: E402
from deltatune.train.cli import main  # noqa: E402
from test_gguf_base import tiny_llama, write_gguf  # noqa: E402
from training_fixtures import model_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

USERS_MODELFILE = "FROM llama3:8b\nADAPTER ./my-other-adapter.gguf\nSYSTEM You are my tuned assistant.\n"
EXPORTS = {"adapter": [], "merged": ["--merged"]}
"""The two kinds of export, by their extra arguments."""


def _lora_on(model: torch.nn.Module, folder: Path) -> Path:
    """A LoRA adapter (B away from zero) on `model`, saved to `folder`."""
    config = deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    deltatune.attach(model, config).save(str(folder))
    return folder


def _gguf_base_and_adapter(folder: Path) -> tuple[Path, Path]:
    base_file = write_gguf(folder / "base.gguf", tiny_llama(seed=0, tied=True))
    return base_file, _lora_on(load_gguf_model(base_file), folder / "adapter")


def _contents(folder: Path) -> dict[str, str]:
    """{path under `folder`: digest of its bytes}, for every file (hidden staging files too)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _refused(arguments: list[str], folder: Path, capsys: pytest.CaptureFixture, match: str) -> None:
    """`deltatune export ARGUMENTS` ends with one line naming `match`, exit status 2, and `folder` unchanged."""
    before = _contents(folder)
    capsys.readouterr()  # what the set-up printed
    assert main(["export", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert match in error and "\n" not in error
    assert _contents(folder) == before


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_export_never_writes_over_its_base_file(tmp_path, capsys, kind):
    base_file, adapter = _gguf_base_and_adapter(tmp_path)
    arguments = [str(adapter), *EXPORTS[kind], "--gguf", str(base_file), "--base", str(base_file), "--overwrite"]
    _refused(arguments, tmp_path, capsys, f"is the base file {base_file}")


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_export_never_writes_into_its_adapter_folder(tmp_path, capsys, kind):
    base_file, adapter = _gguf_base_and_adapter(tmp_path)
    arguments = [str(adapter), *EXPORTS[kind], "--gguf", str(adapter / "x.gguf"), "--base", str(base_file)]
    _refused([*arguments, "--overwrite"], tmp_path, capsys, f"is inside the adapter folder {adapter}")


def test_export_never_writes_into_its_base_folder(tmp_path, capsys):
    folder = model_folder(tmp_path, "causal-lm")
    adapter = _lora_on(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    arguments = [str(adapter), "--gguf", str(folder / "x.gguf"), "--base", str(folder), "--overwrite"]
    _refused(arguments, tmp_path, capsys, f"is inside the base folder {folder}")


def test_export_keeps_an_existing_modelfile_unless_overwrite(tmp_path, capsys):
    base_file, adapter = _gguf_base_and_adapter(tmp_path)
    models = tmp_path / "ollama"
    models.mkdir()
    (models / "Modelfile").write_text(USERS_MODELFILE)
    arguments = [str(adapter), "--gguf", str(models / "new.gguf"), "--base", str(base_file)]
    _refused(arguments, tmp_path, capsys, f"{models / 'Modelfile'} exists")
    assert main(["export", *arguments, "--overwrite"]) == 0
    assert (models / "Modelfile").read_text() == f"FROM {base_file.resolve()}\nADAPTER ./new.gguf\n"
    assert (models / "new.gguf").is_file()


def test_export_keeps_an_existing_gguf_file_unless_overwrite(tmp_path, capsys):
    base_file, adapter = _gguf_base_and_adapter(tmp_path)
    out = tmp_path / "out" / "a.gguf"
    out.parent.mkdir()
    out.write_bytes(b"someone else's file")
    for kind in EXPORTS.values():
        _refused([str(adapter), *kind, "--gguf", str(out), "--base", str(base_file)], tmp_path, capsys, "exists")


def test_export_writes_neither_file_where_the_modelfile_path_is_a_folder(tmp_path, capsys):
    """The GGUF file and the Modelfile are written together or not at all: a folder named Modelfile is never
    replaced, even with --overwrite, so the GGUF file is not written either."""
    base_file, adapter = _gguf_base_and_adapter(tmp_path)
    (tmp_path / "out" / "Modelfile").mkdir(parents=True)
    arguments = [str(adapter), "--gguf", str(tmp_path / "out" / "a.gguf"), "--base", str(base_file), "--overwrite"]
    _refused(arguments, tmp_path, capsys, "is a folder")
    assert not (tmp_path / "out" / "a.gguf").exists()
