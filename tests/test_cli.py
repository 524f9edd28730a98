"""The `deltatune` command."""

from __future__ import annotations

import deltatune
from deltatune.train.cli import main
from tiny_models import build


def test_methods_lists_the_builtin_methods(capsys) -> None:
    assert main(["methods"]) == 0
    assert {"lora", "bitfit"} <= set(capsys.readouterr().out.split())


def test_show_describes_an_adapter_folder(tmp_path, capsys) -> None:
    deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"])).save(tmp_path / "a")
    assert main(["show", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "deltatune adapter, method lora" in out and "2 tensors" in out


def test_show_of_a_missing_folder_is_one_clear_line(tmp_path, capsys) -> None:
    assert main(["show", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: cannot read") and "Traceback" not in err
