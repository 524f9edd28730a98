"""The `deltatune` command."""

from __future__ import annotations

import pytest
import transformers

import deltatune
from deltatune.train.cli import main
from tiny_models import build
from training_fixtures import save_two_adapters, task_config


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


def test_eval_refuses_an_adapter_folder_of_several_adapters_before_loading(tmp_path, monkeypatch, capsys) -> None:
    """`eval --adapter` would evaluate the active adapter (the first) and report it as the folder's."""
    import deltatune.train.loop as loop

    config = task_config(tmp_path, "causal-lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-causal-lm")
    adapters = save_two_adapters(model, tmp_path / "adapters")
    monkeypatch.setattr(loop, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    capsys.readouterr()  # what the setup printed
    assert main(["eval", str(config), "--adapter", str(adapters)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 2 adapters (a, b)" in err[0] and str(adapters / "a") in err[0], err
