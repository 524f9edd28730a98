"""Config values are what their fields say, wherever they come from: a YAML file, a `key=value`
override, an adapter_config.json on disk, or Python. A quoted "false" is text, not a switch; a bool is
not a number; numbers are finite; patterns compile; configs that users register are held to the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import deltatune
from deltatune.train.config import ConfigError, TrainConfig
from tiny_models import build
from training_fixtures import task_config

SWITCHES = {
    "bf16": "bf16",
    "chat_template": "chat_template",
    "gradient_checkpointing": "gradient_checkpointing",
    "use_rslora": "adapter.use_rslora",
}
"""Yes/no settings of the training config, by the override key that sets them."""


def with_value(config: Path, key: str, value: object) -> Path:
    """The YAML config file with `key` (dotted for the adapter section) set to `value`."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    *parents, leaf = key.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config


@pytest.mark.parametrize("field", list(SWITCHES))
def test_quoted_false_in_a_config_file_is_refused_not_switched_on(field: str, tmp_path: Path) -> None:
    config = with_value(task_config(tmp_path, "causal-lm"), SWITCHES[field], "false")
    assert "'false'" in config.read_text(encoding="utf-8"), "the YAML file must hold the quoted text"
    with pytest.raises(ConfigError, match=f"{field} must be true(, false)? or .*got 'false'"):
        TrainConfig.from_yaml(config)


@pytest.mark.parametrize("field", list(SWITCHES))
def test_quoted_false_in_an_override_is_refused_not_switched_on(field: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be true(, false)? or .*got 'false'"):
        TrainConfig.from_yaml(task_config(tmp_path, "causal-lm"), [f'{SWITCHES[field]}="false"'])


@pytest.mark.parametrize("field", list(SWITCHES))
def test_unquoted_false_keeps_the_switch_off(field: str, tmp_path: Path) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm"), [f"{SWITCHES[field]}=false"])
    value = config.adapter_config().use_rslora if field == "use_rslora" else getattr(config, field)
    assert value is False


def saved_lora_with_text_switch(folder: Path, file_format: str) -> Path:
    """A saved LoRA adapter whose adapter_config.json says use_rslora "false" (text)."""
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    delta_model.save(str(folder), format=file_format)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    settings = data if file_format == "peft" else data["config"]
    assert settings.get("use_rslora", False) is False  # a lean peft file leaves the off switch out
    settings["use_rslora"] = "false"
    path.write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize("file_format", ["deltatune", "peft"])
def test_quoted_false_in_a_saved_adapter_config_is_refused_not_read_as_rslora(file_format: str, tmp_path: Path) -> None:
    folder = saved_lora_with_text_switch(tmp_path / "adapter", file_format)
    with pytest.raises(deltatune.DeltaTuneError, match="use_rslora must be true or false, got 'false'"):
        deltatune.load(build("llama"), str(folder))


@pytest.mark.parametrize(
    "changes", [{"r": True}, {"lora_alpha": False}, {"lora_dropout": False}, {"rank_pattern": {"q_proj": True}}]
)
def test_a_bool_is_not_a_number(changes: dict) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=f"{next(iter(changes))} must be"):
        deltatune.LoraConfig(**changes)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=r"lora_alpha must be a number, got"):
        deltatune.LoraConfig(lora_alpha=value)
    with pytest.raises(deltatune.DeltaTuneError, match=r"scaling must be a number or null, got"):
        deltatune.BottleneckConfig(scaling=value)


def test_whole_numbers_are_numbers_and_sequences_are_lists() -> None:
    config = deltatune.LoraConfig(
        r=4, lora_alpha=16, target_modules=("q_proj", "v_proj"), modules_to_save={"score"}, layers_to_transform=(1, 0)
    )
    assert (config.lora_alpha, config.target_modules, config.modules_to_save, config.layers_to_transform) == (
        16,
        ["q_proj", "v_proj"],
        ["score"],
        [1, 0],
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": "q_proj("},
        {"exclude_modules": "*"},
        {"rank_pattern": {"[": 2}},
        {"alpha_pattern": {"(?P<": 2.0}},
    ],
)
def test_a_pattern_that_does_not_compile_is_refused_when_the_config_is_made(changes: dict) -> None:
    field = next(iter(changes))
    with pytest.raises(deltatune.DeltaTuneError, match=f"{field} must be .*regular expression"):
        deltatune.LoraConfig(**changes)


def test_numbers_written_as_text_are_read_as_numbers(tmp_path: Path) -> None:
    """YAML reads 1e-4 (no dot) as text; in a number field it is meant as a number."""
    config = TrainConfig.from_yaml(
        task_config(tmp_path, "causal-lm"),
        ["learning_rate=1e-4", "adapter.lora_alpha=1e2", "adapter.lora_dropout=5e-2"],
    )
    adapter = config.adapter_config()
    assert (config.learning_rate, adapter.lora_alpha, adapter.lora_dropout) == (1e-4, 100.0, 0.05)


def test_adapter_section_is_checked_when_the_training_config_is_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adapter: r must be a whole number ≥ 1, got 0"):
        TrainConfig.from_yaml(task_config(tmp_path, "causal-lm"), ["adapter.r=0"])


def test_training_config_made_in_python_is_checked(tmp_path: Path) -> None:
    records = [{"prompt": "red cat", "completion": "the cat is red"}] * 4
    assert TrainConfig(model="m", train_file=iter(records), eval_file=records).eval_file == records
    assert TrainConfig(model="m", train_file=tmp_path / "train.jsonl").train_file == tmp_path / "train.jsonl"
    with pytest.raises(ConfigError, match="batch_size must be a whole number ≥ 1, got 0"):
        TrainConfig(model="m", train_file="train.jsonl", batch_size=0)
    with pytest.raises(ConfigError, match="train_file must be .*iterable of mappings, got"):
        TrainConfig(model="m", train_file={"prompt": "a", "completion": "b"})


@dataclasses.dataclass
class StrengthConfig(deltatune.TargetedConfig):
    """A config a user might register: its fields are checked like the built-in ones."""

    strength: float = 1.0
    steps: int = 1
    mode: str | None = None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strength": "high"}, "strength must be a number, got 'high'"),
        ({"steps": True}, "steps must be a whole number, got True"),
        ({"mode": 3}, "mode must be a string or null, got 3"),
        ({"target_modules": 3}, "target_modules must be a list of strings, a regular expression or null, got 3"),
    ],
)
def test_fields_of_a_user_config_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        StrengthConfig(**changes)


def test_a_user_config_whose_annotation_cannot_be_resolved_still_checks_the_others() -> None:
    class Local:
        pass

    @dataclasses.dataclass
    class LocalConfig(deltatune.TargetedConfig):
        helper: Local | None = None
        steps: int = 1

    assert LocalConfig(helper=Local()).steps == 1
    with pytest.raises(deltatune.DeltaTuneError, match="steps must be a whole number, got '2'"):
        LocalConfig(steps="2")
