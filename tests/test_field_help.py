"""Config fields documented where users look: `deltatune methods NAME` prints every field of the
method's config with what it accepts, its default and the docstring under it; `deltatune train
--help` names every training config key and where it is documented; every field of every config has
a document; a run prints one start line (model, task, labels, method, trainable parameters, steps,
device)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from deltatune import registered_methods
from deltatune.field_docs import field_docs
from deltatune.methods.lora import LoraConfig
from deltatune.registry import get_method
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.start_line import start_line
from training_fixtures import task_config


@dataclasses.dataclass
class Parent:
    inherited: int = 1
    """Documented in the parent."""


@dataclasses.dataclass
class Child(Parent):
    documented: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    """First line.
    Second line."""
    plain: str | None = None
    # a comment is not a document
    after_comment: bool = False
    """Under its field even after a plain one."""


def test_field_docs_reads_the_string_under_each_field_inherited_ones_too() -> None:
    docs = {field.name: field for field in field_docs(Child)}
    assert list(docs) == ["inherited", "documented", "plain", "after_comment"]
    assert docs["inherited"].doc == "Documented in the parent." and docs["inherited"].default == "1"
    assert docs["documented"].doc == "First line.\nSecond line." and docs["documented"].default == '["a"]'
    assert docs["documented"].accepts == "a list of strings"
    assert docs["plain"].doc == "" and docs["plain"].accepts == "a string or null"
    assert docs["after_comment"].doc == "Under its field even after a plain one."


BUILT_IN_CONFIGS = [
    get_method(name).config_class
    for name in registered_methods()
    if type(get_method(name)).__module__.startswith("deltatune.")
]
"""The library's method configs (tests register methods of their own)."""


@pytest.mark.parametrize(
    "config_class", [TrainConfig, *BUILT_IN_CONFIGS], ids=lambda config_class: config_class.__name__
)
def test_every_config_field_has_a_document(config_class: type) -> None:
    assert [field.name for field in field_docs(config_class) if not field.doc] == []


def test_methods_lora_prints_every_field_with_its_default_and_document(capsys) -> None:
    assert main(["methods", "lora"]) == 0
    printed = capsys.readouterr().out
    defaults = LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        value = json.dumps(getattr(defaults, field.name), default=str)
        assert f"\n  {field.name}: " in printed and f"(default {value})\n" in printed, field.name
    assert "\n  r: a whole number ≥ 1 (default 8)\n      Rank of the update B A.\n" in printed


def test_methods_with_an_unknown_name_is_one_line_with_the_close_name(capsys) -> None:
    assert main(["methods", "lorra"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Did you mean 'lora'" in error


def test_train_help_names_every_config_key_and_where_it_is_documented(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "deltatune/train/config.py" in printed and "deltatune methods NAME" in printed
    for field in dataclasses.fields(TrainConfig):
        assert f" {field.name}," in printed or f" {field.name} " in printed, field.name


def test_a_run_starts_with_one_line_naming_model_task_labels_method_parameters_steps_device(tmp_path, capsys) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", device="cpu"))
    result = train(config, progress=True)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training: ")]
    parameters = result.run.delta_model.trainable_summary()
    assert line == (
        f"training: model {config.model}, task seq-cls, 2 labels (no, yes), method lora, "
        f"{parameters.trainable:,} trainable parameters of {parameters.total:,} "
        f"({100 * parameters.trainable / parameters.total:.4f}%), 6 steps, device cpu"
    )
    assert start_line(result.run, 6, 3).endswith(", steps 4 to 6 (resumed), device cpu")
