"""Every saved adapter folder holds a model card (`README.md`, `deltatune.model_card`): it names the base,
method, config, trainable parameters, the files, and how to load the folder; the code it shows runs; a
README the user wrote is never replaced."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.model_card import MARKER
from tiny_models import build, run

CONFIG = deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])


def _named_base(tmp_path: Path) -> torch.nn.Module:
    """A tiny Llama loaded from a folder, so that its `name_or_path` is that folder."""
    build("llama").save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


def _trained(model: torch.nn.Module, names: tuple[str, ...] = ("default",)) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(model, CONFIG, name=names[0])
    for name in names[1:]:
        delta_model.add(name, CONFIG)
    with torch.no_grad():
        for name in names:
            for parameter in delta_model.adapter_parameters(name):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return delta_model.eval()


def _code_blocks(card: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, flags=re.DOTALL)


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_card_is_written_names_the_files_and_the_folder_loads_back(format: str, tmp_path: Path) -> None:
    delta_model = _trained(_named_base(tmp_path))
    delta_model.save(str(tmp_path / "adapter"), format=format)
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert MARKER in card and f'base_model: "{tmp_path / "base"}"' in card
    for name in files:
        assert f"`{name}`" in card
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"{size / 1e3:.1f} kB" in card
    count = delta_model.trainable_summary().per_adapter["default"]
    assert f"**Trainable parameters:** {count:,}" in card and '"r": 4' in card
    loaded = deltatune.load(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(run(loaded.eval(), "llama"), run(delta_model, "llama"))


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_the_cards_python_snippets_load_the_adapter_with_its_outputs(
    format: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deltatune's snippet for both formats; peft's and transformers' `load_adapter` for the peft format."""
    if format == "peft":
        pytest.importorskip("peft")
    delta_model = _trained(_named_base(tmp_path))
    delta_model.save(str(tmp_path / "adapter"), format=format)
    with torch.no_grad():
        expected = run(delta_model, "llama")
    snippets = _code_blocks((tmp_path / "adapter" / "README.md").read_text(), "python")
    assert len(snippets) == (3 if format == "peft" else 1)
    monkeypatch.chdir(tmp_path)  # the card names the folder by its own name
    for snippet in snippets:
        namespace: dict = {}
        exec(snippet, namespace)
        model = namespace.get("model", namespace["base"]).eval()
        with torch.no_grad():
            assert torch.allclose(run(model, "llama"), expected, atol=1e-6)


def test_the_cards_merge_command_writes_a_model_with_the_adapters_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.train.cli import main
    from training_fixtures import model_folder

    base = AutoModelForCausalLM.from_pretrained(model_folder(tmp_path, "causal-lm")).eval()  # with a tokenizer
    delta_model = _trained(base)
    delta_model.save(str(tmp_path / "adapter"))
    (command,) = _code_blocks((tmp_path / "adapter" / "README.md").read_text(), "bash")
    monkeypatch.chdir(tmp_path)
    assert command.split()[:2] == ["deltatune", "merge"]
    assert main(command.split()[1:]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-model").eval()
    with torch.no_grad():
        assert torch.allclose(run(merged, "llama"), run(delta_model, "llama"), atol=1e-5)


def test_a_readme_the_user_wrote_is_never_replaced(tmp_path: Path) -> None:
    delta_model = _trained(build("llama"), ("first", "second"))
    single, several = tmp_path / "single", tmp_path / "several"
    delta_model.save(str(single), names=["first"])
    delta_model.save(str(several))
    mine = "# My adapter\nnotes I wrote\n"
    (single / "README.md").write_text(mine)
    (several / "first" / "README.md").write_text(mine)
    delta_model.save(str(single), names=["first"])
    delta_model.save(str(several))
    assert (single / "README.md").read_text() == mine
    assert (several / "first" / "README.md").read_text() == mine
    assert MARKER in (several / "second" / "README.md").read_text()
    assert deltatune.load(build("llama"), str(several)).configs.keys() == {"first", "second"}


def test_a_card_a_save_wrote_is_replaced_by_the_next_save(tmp_path: Path) -> None:
    delta_model = _trained(build("llama"), ("first", "second"))
    delta_model.save(str(tmp_path / "adapter"), names=["first"])
    delta_model.save(str(tmp_path / "adapter"), names=["second"])
    assert "# Adapter `second`" in (tmp_path / "adapter" / "README.md").read_text()
    delta_model.save(str(tmp_path / "adapter"))  # now two subfolders: the old top-level card goes
    assert sorted(os.listdir(tmp_path / "adapter")) == ["first", "second"]


def test_the_trainers_adapter_folder_card_lists_the_final_metrics(tmp_path: Path) -> None:
    import json

    from deltatune.train.cli import main
    from training_fixtures import task_config

    assert main(["train", str(task_config(tmp_path, "seq-cls", max_steps=2)), "--quiet"]) == 0
    card = (tmp_path / "out" / "adapter" / "README.md").read_text()
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]
    assert "## Final metrics" in card
    for name, value in final.items():
        assert f"| {name} | {value:.4g} |" in card


def test_the_card_of_an_adapter_that_cannot_merge_shows_no_merge_command(tmp_path: Path) -> None:
    """A bottleneck adapter changes the model's function in a way no weight holds: the card says to load it
    with deltatune instead of printing a `deltatune merge` that would fail."""
    delta_model = deltatune.attach(_named_base(tmp_path), deltatune.BottleneckConfig(preset="pfeiffer"))
    delta_model.save(str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert _code_blocks(card, "bash") == []
    assert "cannot be merged" in card


def test_the_card_of_an_adapterhub_folder_loads_it_in_adapterhub_with_its_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("adapters", reason="AdapterHub runs in the transformers 4.57 environment")
    delta_model = deltatune.attach(_named_base(tmp_path), deltatune.BottleneckConfig(preset="pfeiffer"))
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
        expected = run(delta_model.eval(), "llama")
    delta_model.save(str(tmp_path / "adapter"), format="adapterhub")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "`adapter.safetensors` | the adapter's weights under AdapterHub's names" in card
    snippets = _code_blocks(card, "python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippets[-1], namespace)
    with torch.no_grad():
        assert torch.allclose(run(namespace["base"].eval(), "llama"), expected, atol=1e-5)
