"""Targeting rules: suffix lists, full-match patterns, all-linear, layers, exclusions."""

from __future__ import annotations

import pytest

import deltatune
from deltatune.targeting import layer_index, matches, pattern_value
from tiny_models import build


@pytest.mark.parametrize(
    "name,spec,expected",
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["_proj"], False),
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
        ("model.layers.0.self_attn.q_proj", r"q_proj", False),
    ],
)
def test_suffix_lists_and_full_match_patterns(name: str, spec, expected: bool) -> None:
    assert matches(name, spec) is expected


@pytest.mark.parametrize(
    "name,patterns,expected",
    [
        ("model.layers.3.mlp.up_proj", None, 3),
        ("transformer.h.11.attn.c_attn", None, 11),
        ("encoder.block.1.layer.0.SelfAttention.q", ["block"], 1),
        ("lm_head", None, None),
    ],
)
def test_layer_index_reads_the_block_number(name: str, patterns, expected) -> None:
    assert layer_index(name, patterns) == expected


def test_pattern_value_uses_the_first_matching_key() -> None:
    patterns = {"q_proj": 8, r"layers\.0\..*": 2}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 4) == 8
    assert pattern_value(patterns, "model.layers.0.self_attn.k_proj", 4) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.k_proj", 4) == 4


def test_regex_target_selects_full_matches_only() -> None:
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(target_modules=r"model\.layers\.0\.mlp\.(up|down)_proj")
    )
    assert delta_model.targets["default"] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_a_regex_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(deltatune.TargetNotFoundError, match="full-match regular expression"):
        deltatune.attach(build("llama"), deltatune.LoraConfig(target_modules=r"q_proj"))


@pytest.mark.parametrize("exclude", [["k_proj", "nope_proj"], r".*nope_proj"], ids=["list", "pattern"])
def test_an_exclusion_that_matches_nothing_warns_naming_the_entry(exclude) -> None:
    with pytest.warns(UserWarning, match=r"exclude_modules entry '(\.\*)?nope_proj' matches no module"):
        delta_model = deltatune.attach(
            build("llama"), deltatune.LoraConfig(target_modules="all-linear", exclude_modules=exclude)
        )
    assert delta_model.targets["default"] and all("nope_proj" not in name for name in delta_model.targets["default"])


def test_only_saved_modules_as_targets_select_nothing_and_say_why() -> None:
    with pytest.raises(deltatune.TargetNotFoundError, match="modules_to_save.*train fully"):
        deltatune.attach(
            build("bert"), deltatune.LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"])
        )


def test_deltatune_modules_are_never_targets() -> None:
    delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules="all-linear"), name="a")
    delta_model.add("b", deltatune.LoraConfig(r=2, target_modules="all-linear"))
    assert delta_model.targets["a"] == delta_model.targets["b"] == ["net.0", "net.2", "head"]
