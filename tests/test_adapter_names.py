"""One rule for adapter names, wherever a name enters: a single safe path component that torch takes as
a module key. Names given to `add`, names recorded in adapter files and folder names are all checked,
so no name can make a save write outside its folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import deltatune
from tiny_models import build, run

RULE = r"names are non-empty, without '\.', '/', '\\', ':' or control characters, at most 200 bytes"


def lora() -> deltatune.LoraConfig:
    return deltatune.LoraConfig(r=2, target_modules=["net.0", "net.2"], init_lora_weights=False)


def saved_folder(tmp_path: Path, names: list[str]) -> Path:
    delta_model = deltatune.attach(build("mlp"), lora(), name=names[0])
    for name in names[1:]:
        delta_model.add(name, lora())
    folder = tmp_path / "saved"
    delta_model.save(str(folder))
    return folder


def files_outside(root: Path, top: Path) -> list[str]:
    """Every path under `top` that is neither `root`, inside it, nor the lock file saves keep beside it."""
    return sorted(
        str(path.relative_to(top))
        for path in top.rglob("*")
        if path != root and root not in path.parents and path.name != ".deltatune.lock"
    )


@pytest.mark.parametrize(
    "bad_name",
    [
        "sub/dir",
        "/absolute",
        "back\\slash",
        "nul\x00byte",
        "new\nline",
        "C:drive",
        "x" * 201,
        "é" * 101,
        "x" * 300,
    ],
)
def test_names_that_are_not_one_safe_path_component_are_refused_with_the_rule(bad_name: str) -> None:
    delta_model = deltatune.attach(build("mlp"), lora())
    with pytest.raises(deltatune.AdapterNameError, match=RULE):
        delta_model.add(bad_name, lora())
    assert list(delta_model.configs) == ["default"]


@pytest.mark.parametrize("reserved", ["training", "forward", "keys", "state_dict"])
def test_names_that_clash_with_torch_module_attributes_are_refused_with_the_rule(reserved: str) -> None:
    model = build("mlp")
    with pytest.raises(deltatune.AdapterNameError, match="is an attribute of torch modules: " + RULE):
        deltatune.attach(model, lora(), name=reserved)
    assert all(parameter.requires_grad for parameter in model.parameters()), "the refused attach left the model frozen"


def test_save_never_writes_outside_root(tmp_path: Path) -> None:
    """A folder from elsewhere records the name '../outside': loading it must not take that name, or the
    next save of several adapters would write `root/../outside`."""
    downloaded = saved_folder(tmp_path / "download", ["default"])
    config = json.loads((downloaded / "adapter_config.json").read_text())
    config["name"] = "../outside"
    (downloaded / "adapter_config.json").write_text(json.dumps(config))
    root = tmp_path / "work" / "root"
    delta_model = deltatune.attach(build("mlp"), lora(), name="mine")
    with pytest.raises(
        deltatune.AdapterFileError,
        match=re.escape("adapter_config.json: adapter name '../outside' contains '.': ") + RULE,
    ):
        deltatune.load(delta_model, str(downloaded))
        delta_model.save(str(root))
    assert list(delta_model.configs) == ["mine"]
    assert files_outside(root, tmp_path / "work") == []


@pytest.mark.parametrize(
    "file_name, content",
    [
        (
            "adapter_config.json",
            {
                "config": {
                    "mh_adapter": False,
                    "output_adapter": True,
                    "reduction_factor": 16,
                    "non_linearity": "relu",
                },
                "name": "../escape",
                "model_type": "bert",
                "hidden_size": 32,
                "version": "1.0",
            },
        ),
        ("adapter_fusion_config.json", {"adapter_names": ["a", "../escape"], "config": {}, "name": "fused"}),
    ],
)
def test_names_recorded_in_adapterhub_folders_follow_the_rule(tmp_path: Path, file_name: str, content: dict) -> None:
    folder = tmp_path / "adapterhub"
    folder.mkdir()
    (folder / file_name).write_text(json.dumps(content))
    with pytest.raises(
        deltatune.AdapterFileError, match=re.escape(f"{file_name}: adapter name '../escape' contains '.': ") + RULE
    ):
        deltatune.load(build("bert"), str(folder))


def test_an_adapter_subfolder_whose_name_breaks_the_rule_is_refused_with_its_path(tmp_path: Path) -> None:
    folder = saved_folder(tmp_path, ["first", "second"])
    os.rename(folder / "second", folder / "training")
    model = build("mlp")
    with pytest.raises(
        deltatune.AdapterFileError, match=r"saved/training: adapter name 'training' is an attribute of torch modules"
    ):
        deltatune.load(model, str(folder))
    assert not any(isinstance(module, deltatune.DeltaModel) for module in model.modules())


def test_the_longest_valid_name_and_any_folder_name_the_file_system_takes_can_be_saved(tmp_path: Path) -> None:
    longest = "é" * 100  # 200 bytes of UTF-8
    delta_model = deltatune.attach(build("mlp"), lora(), name=longest)
    delta_model.add("a,b", lora())
    expected = {name: run(delta_model.activate(name), "mlp").detach() for name in (longest, "a,b")}
    for folder_name in ("x" * 240, "y" * 255):
        folder = tmp_path / folder_name
        delta_model.save(str(folder))
        loaded = deltatune.load(build("mlp"), str(folder))
        assert sorted(loaded.configs) == sorted(expected)
        for name, output in expected.items():
            assert torch.equal(run(loaded.activate(name), "mlp"), output)
        delta_model.save(str(folder), names=[longest])
        assert torch.equal(run(deltatune.load(build("mlp"), str(folder)), "mlp"), expected[longest])
