"""Each method's recommended training settings (`deltatune.train.method_defaults`): taken where a config
leaves a field out, never where it sets one, held in the run identity so `--resume` stays exact and
refuses a changed default; and `head_learning_rate` reaching exactly the task head's parameters."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from deltatune.registry import get_method, registered_methods
from deltatune.train.cli import main
from deltatune.train.compare_plan import Budget, plan_comparison
from deltatune.train.config import SCHEDULERS, TrainConfig
from deltatune.train.fingerprint import run_record
from deltatune.train.loop import prepare_run, train_run
from deltatune.train.method_defaults import DEFAULTS, FALLBACK, TRAINING_FIELDS, defaults_for
from deltatune.train.optimizer import build_optimizer
from deltatune.train.schedule import learning_rate_factor
from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
from training_fixtures import task_config, write_config

LEFT_OUT = {"learning_rate": None, "scheduler": None}
"""task_config sets these; null leaves them to the method."""
SET = {"learning_rate": 0.0123, "head_learning_rate": 0.0456, "scheduler": "cosine", "warmup_ratio": 0.5}
"""Values no row of the table holds."""
ADAPTER_SETTINGS = {"method": "lora", "r": 4, "target_modules": "all-linear"}


NEEDS = {"trainable_tokens": {"token_indices": [1, 2]}}
"""The fields a method cannot be built without."""


def config_for(tmp_path: Path, method: str, **settings) -> TrainConfig:
    adapter = {"method": method, **NEEDS.get(method, {})}
    return TrainConfig.from_yaml(
        task_config(tmp_path, "seq-cls", arch="bert", method=adapter, **{**LEFT_OUT, **settings})
    )


def test_every_registered_method_has_a_row_or_the_stated_fallback() -> None:
    assert set(DEFAULTS) <= set(registered_methods())  # no row for a method that does not exist
    assert FALLBACK.source and all(row.source for row in DEFAULTS.values())
    for method in registered_methods():
        row = defaults_for(method)
        assert row is DEFAULTS.get(method, FALLBACK)
        assert row.scheduler in SCHEDULERS and 0 <= row.warmup_ratio <= 1, method
        assert row.learning_rate > 0 and row.head_learning_rate > 0, method
        fields = {field.name for field in dataclasses.fields(get_method(method).config_class)}
        assert set(row.adapter) <= fields, method  # every adapter default names a field of the method's config


@pytest.mark.parametrize("method", registered_methods())
def test_fields_left_out_take_the_method_row(tmp_path: Path, method: str) -> None:
    if method == "fusion":
        pytest.skip("a fusion config needs the trained adapters it fuses; its row (FALLBACK) is checked above")
    config = config_for(tmp_path, method)
    row = defaults_for(method)
    assert [getattr(config, name) for name in TRAINING_FIELDS] == [getattr(row, name) for name in TRAINING_FIELDS]
    assert config.warmup_steps is None
    assert all(config.adapter[key] == value for key, value in row.adapter.items())
    built = config.adapter_config()
    assert all(getattr(built, key) == value for key, value in row.adapter.items())


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_values_the_config_sets_are_never_replaced(tmp_path: Path, method: str) -> None:
    row = defaults_for(method)
    adapter = {"method": method, **{key: _other(value) for key, value in row.adapter.items()}}
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", arch="bert", method=adapter, **SET))
    assert {name: getattr(config, name) for name in SET} == SET
    assert {key: config.adapter[key] for key in adapter} == adapter


def _other(value: int) -> int:
    """A value of the same kind as an adapter default, not equal to it."""
    return value * 2


def test_warmup_steps_set_wins_and_leaves_the_ratio_unset(tmp_path: Path) -> None:
    config = config_for(tmp_path, "lora", warmup_steps=3)
    assert (config.warmup_steps, config.warmup_ratio) == (3, None)
    factor = learning_rate_factor(config, 100)
    assert [factor(step) for step in (0, 2, 3)] == [1 / 4, 3 / 4, 1.0]


def test_the_warmup_ratio_warms_up_its_share_of_the_steps(tmp_path: Path) -> None:
    config = config_for(tmp_path, "lora", warmup_ratio=0.25)
    factor = learning_rate_factor(config, 10)  # ⌊0.25 × 10⌋ = 2 warm-up steps, then linear to zero over 8
    assert [factor(step) for step in range(4)] == [1 / 3, 2 / 3, 1.0, 7 / 8]


def test_the_run_identity_holds_the_resolved_values(tmp_path: Path) -> None:
    config = config_for(tmp_path, "bitfit")
    fingerprint = run_record(config, [], 1)["fingerprint"]
    row = DEFAULTS["bitfit"]
    assert [fingerprint[name] for name in TRAINING_FIELDS] == [getattr(row, name) for name in TRAINING_FIELDS]
    lora = run_record(config_for(tmp_path, "lora"), [], 1)["fingerprint"]
    assert (lora["adapter.r"], lora["adapter.lora_alpha"]) == (DEFAULTS["lora"].adapter["r"], 16)


def test_metrics_record_the_resolved_values(tmp_path: Path) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", method={"method": "bitfit"}, **LEFT_OUT, max_steps=2)
    assert main(["train", str(config), "--quiet"]) == 0
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]
    row = DEFAULTS["bitfit"]
    assert [recorded[name] for name in TRAINING_FIELDS] == [getattr(row, name) for name in TRAINING_FIELDS]


def test_resume_on_defaults_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    settings = {**RESUME_SETTINGS, **LEFT_OUT, "warmup_steps": None}
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **settings), tmp_path)


def test_resume_after_the_recommended_rate_changed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, **LEFT_OUT})
    assert main(["train", str(config), "--quiet"]) == 0
    changed = dataclasses.replace(DEFAULTS["lora"], learning_rate=DEFAULTS["lora"].learning_rate / 2)
    monkeypatch.setitem(DEFAULTS, "lora", changed)
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("deltatune: --resume: ") and "learning_rate" in line, line


def test_compare_gives_each_method_its_own_defaults_and_everyone_a_set_value(tmp_path: Path) -> None:
    path = task_config(tmp_path, "seq-cls", arch="bert", method=ADAPTER_SETTINGS, **LEFT_OUT)
    _, plans = plan_comparison(path, ["lora", "bitfit", "full"], [], [], Budget(), False)
    assert [plan.config.learning_rate for plan in plans] == [DEFAULTS[plan.method].learning_rate for plan in plans]
    assert [plan.config.head_learning_rate for plan in plans] == [
        DEFAULTS[plan.method].head_learning_rate for plan in plans
    ]
    assert plans[0].config.adapter["r"] == 4  # the config's own LoRA section
    _, plans = plan_comparison(path, ["lora", "bitfit"], ["learning_rate=0.0123"], [], Budget(), True)
    assert [plan.config.learning_rate for plan in plans] == [0.0123, 0.0123]


def parameter_names(model: torch.nn.Module, group: dict) -> set[str]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {names[id(parameter)] for parameter in group["params"]}


def trainable_under(model: torch.nn.Module, head: str) -> set[str]:
    """The trainable parameters whose name lies below module `head` of the transformers model: the
    reference the head group is checked against, found by name rather than by module."""
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and f".{head}." in f".{name.removeprefix('base_model.')}"
    }


@pytest.mark.parametrize(
    ("method", "head_names"),
    [(ADAPTER_SETTINGS, {"copy.weight", "copy.bias"}), ({"method": "full"}, {"classifier.weight", "classifier.bias"})],
    ids=["lora-modules-to-save-copy", "full-own-parameters"],
)
def test_head_learning_rate_reaches_exactly_the_head_parameters(
    tmp_path: Path, method: dict, head_names: set[str]
) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", arch="bert", method=method, **SET))
    run = prepare_run(config, torch.device("cpu"))
    groups = build_optimizer(run.delta_model, config).param_groups
    head, rest = groups[-1], groups[:-1]
    named = parameter_names(run.delta_model, head)
    assert named == trainable_under(run.delta_model, "classifier")
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in named} == head_names
    assert head["lr"] == SET["head_learning_rate"] and all(group["lr"] == SET["learning_rate"] for group in rest)
    everything = {name for name, parameter in run.delta_model.named_parameters() if parameter.requires_grad}
    assert set().union(*(parameter_names(run.delta_model, group) for group in groups)) == everything
    assert sum(len(group["params"]) for group in groups) == len(everything)  # each parameter in one group


def test_with_loraplus_the_head_is_a_fifth_group_out_of_the_loraplus_ones(tmp_path: Path) -> None:
    config = TrainConfig.from_yaml(
        task_config(tmp_path, "seq-cls", arch="bert", method=ADAPTER_SETTINGS, **SET, loraplus_lr_ratio=16)
    )
    run = prepare_run(config, torch.device("cpu"))
    groups = build_optimizer(run.delta_model, config).param_groups
    assert len(groups) == 5 and groups[-1]["lr"] == SET["head_learning_rate"]
    assert parameter_names(run.delta_model, groups[-1]) == trainable_under(run.delta_model, "classifier")
    assert [group["lr"] for group in groups[:4]] == [0.0123, 1e-6, 0.0123 * 16, 0.0123 * 16]


def test_a_task_without_a_new_head_has_no_head_group(tmp_path: Path) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", ADAPTER_SETTINGS, **SET))
    run = prepare_run(config, torch.device("cpu"))
    (group,) = build_optimizer(run.delta_model, config).param_groups
    assert group["lr"] == SET["learning_rate"]


def test_a_higher_head_rate_moves_the_head_further_in_one_step(tmp_path: Path) -> None:
    """The schedule scales the head's rate like the rest: after one step from the same start, the
    head moved by AdamW's first step, lr × sign(g) per element (|Δ| = head rate), the adapter by its rate."""
    settings = {**SET, "scheduler": "constant", "warmup_ratio": 0.0, "max_steps": 1, "max_grad_norm": None}
    path = task_config(tmp_path, "seq-cls", arch="bert", method=ADAPTER_SETTINGS, eval_file=None, **settings)
    config = TrainConfig.from_yaml(path)
    run = prepare_run(config, torch.device("cpu"))
    head = dict(run.delta_model.named_parameters())
    names = sorted(trainable_under(run.delta_model, "classifier"))
    before = {name: head[name].detach().clone() for name in names}
    train_run(run, progress=False)
    for name in names:
        moved = (head[name].detach() - before[name]).abs()
        assert math.isclose(moved.max().item(), SET["head_learning_rate"], rel_tol=1e-3), name


def test_yaml_without_the_fields_reads_like_one_that_sets_the_recommended_values(tmp_path: Path) -> None:
    row = DEFAULTS["lora"]
    explicit = {name: getattr(row, name) for name in TRAINING_FIELDS}
    left = config_for(tmp_path, "lora")
    given = TrainConfig.from_yaml(write_config(tmp_path / "given.yaml", **{**left.to_dict(), **explicit}))
    assert left.to_dict() == given.to_dict()


def built_in_methods() -> list[str]:
    """The registered methods deltatune ships (other tests register methods of their own)."""
    return [name for name in registered_methods() if type(get_method(name)).__module__.startswith("deltatune.")]


def test_the_docs_table_is_the_module_table() -> None:
    """docs/defaults.md lists every built-in method with the rates `defaults_for` gives it."""
    page = (Path(__file__).parent.parent / "docs" / "defaults.md").read_text(encoding="utf-8")
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [cells for cells in rows if len(cells) == len(rows[0])][1:]  # the first table: the defaults
    listed = {cells[0].removeprefix("| ").removesuffix(" (fallback)"): cells for cells in rows}
    assert sorted(listed) == built_in_methods()
    for method, cells in listed.items():
        row = defaults_for(method)
        assert (float(cells[1]), float(cells[2]), cells[3]) == (
            row.learning_rate,
            row.head_learning_rate,
            row.scheduler,
        )
        assert cells[0].endswith("(fallback)") == (method not in DEFAULTS), method
