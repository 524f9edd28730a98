"""A method registered outside the library reads and writes peft's folders through its own codec, with
no edit to deltatune: its `peft_codec` gives its peft type, its config fields and its tensor names;
peft's general rules (the `base_model.model.` prefix, `modules_to_save`, the task type) are the library's.

The method: a learned gain g on each adapted Linear layer's outputs, y ← y ⊙ (1 + g), g = 0 at start;
on a Linear layer without bias that is the layer with weight (1 + g)[:, None] ⊙ W.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import deltatune
from deltatune import registry
from tiny_models import build, run

FULL_TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@dataclasses.dataclass
class OutputGainConfig(deltatune.TargetedConfig):
    """Settings of the output-gain method."""

    init_gain: float = 0.0
    """Starting value of every gain."""


class OutputGain(deltatune.SiteAdapter):
    """g over the output features of an `nn.Linear`."""

    def __init__(self, module: nn.Linear, module_name: str, config: OutputGainConfig) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((module.out_features,), config.init_gain, device=module.weight.device))

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output * (1 + self.gain.to(output.dtype))


class OutputGainPeft(deltatune.PeftCodec):
    """The method in peft's files: peft type "OUTPUT_GAIN", its gains under `<module>.output_gain`."""

    peft_type = "OUTPUT_GAIN"
    tensor_names = {OutputGain: {"gain": "output_gain"}}

    def config_to_peft(self, config: OutputGainConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {"target_modules": targets, "init_gain": config.init_gain}

    def config_from_peft(self, data: dict[str, Any]) -> OutputGainConfig:
        return OutputGainConfig(target_modules=data["target_modules"], init_gain=data.get("init_gain", 0.0))


@deltatune.register("output_gain")
class OutputGainMethod(deltatune.ModuleMethod):
    """Gains on the outputs of the selected Linear layers."""

    config_class = OutputGainConfig
    adapter_types = {nn.Linear: OutputGain}
    peft_codec = OutputGainPeft()


def gained_model(**options: Any) -> deltatune.DeltaModel:
    """A tiny Llama with an output-gain adapter whose parameters are away from their start."""
    delta_model = deltatune.attach(build("llama"), OutputGainConfig(target_modules=FULL_TARGETS, **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return delta_model


def file_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as file:
        return set(file.keys())


def test_a_method_registered_outside_the_library_saves_in_peft_format_through_its_codec(tmp_path: Path) -> None:
    delta_model = gained_model(modules_to_save=["norm"])
    delta_model.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OUTPUT_GAIN" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == FULL_TARGETS and config["modules_to_save"] == ["norm"]
    expected_keys = {f"base_model.model.{target}.output_gain" for target in FULL_TARGETS} | {
        "base_model.model.model.norm.weight"
    }
    assert file_keys(tmp_path / "adapter" / "adapter_model.safetensors") == expected_keys


def test_a_method_registered_outside_the_library_loads_its_peft_folder_with_the_same_outputs(tmp_path: Path) -> None:
    delta_model = gained_model(modules_to_save=["norm"])
    delta_model.save(tmp_path / "adapter", format="peft")
    loaded = deltatune.load(build("llama"), str(tmp_path / "adapter"))
    assert isinstance(loaded.configs["default"], OutputGainConfig) and loaded.configs["default"].modules_to_save == [
        "norm"
    ]
    assert torch.equal(run(loaded, "llama"), run(delta_model, "llama"))


def hand_written_folder(folder: Path, gains: dict[str, torch.Tensor]) -> None:
    """A peft-layout folder of the output-gain method, written without deltatune."""
    folder.mkdir()
    config = {
        "peft_type": "OUTPUT_GAIN",
        "task_type": "CAUSAL_LM",
        "target_modules": sorted(gains),
        "init_gain": 0.0,
        "peft_version": "0.21.2",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {f"base_model.model.{target}.output_gain": gain for target, gain in gains.items()},
        str(folder / "adapter_model.safetensors"),
    )


def test_a_hand_written_peft_folder_of_a_method_registered_outside_the_library_loads(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    base = build("llama")
    gains = {
        target: 0.5 * torch.randn(base.get_submodule(target).out_features, generator=generator)
        for target in FULL_TARGETS
    }
    hand_written_folder(tmp_path / "adapter", gains)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for target, gain in gains.items():
            by_hand.get_submodule(target).weight.mul_((1 + gain)[:, None])
    loaded = deltatune.load(base, str(tmp_path / "adapter"))
    assert loaded.targets["default"] == FULL_TARGETS
    torch.testing.assert_close(run(loaded, "llama"), run(by_hand, "llama"), atol=1e-5, rtol=1e-5)


def test_a_peft_folder_without_a_tensor_the_codec_names_is_refused_naming_it(tmp_path: Path) -> None:
    base = build("llama")
    hand_written_folder(
        tmp_path / "adapter", {FULL_TARGETS[0]: torch.zeros(base.get_submodule(FULL_TARGETS[0]).out_features)}
    )
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": FULL_TARGETS}))
    with pytest.raises(
        deltatune.AdapterShapeError, match=rf"no tensor 'base_model.model.{FULL_TARGETS[1]}.output_gain'"
    ):
        deltatune.load(base, str(tmp_path / "adapter"))


class TwinMethod(OutputGainMethod):
    """Another method whose codec claims the same peft type."""

    peft_codec = OutputGainPeft()


def test_a_peft_type_claimed_by_two_registered_methods_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry._METHODS, "output_gain_twin", TwinMethod())
    base = build("llama")
    hand_written_folder(
        tmp_path / "adapter", {FULL_TARGETS[0]: torch.zeros(base.get_submodule(FULL_TARGETS[0]).out_features)}
    )
    with pytest.raises(deltatune.DeltaTuneError, match=r"'output_gain', 'output_gain_twin'.*OUTPUT_GAIN"):
        deltatune.load(base, str(tmp_path / "adapter"))
