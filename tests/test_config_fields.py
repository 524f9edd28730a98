"""Every field of the training config and of every built-in method config refuses a value of the wrong
type, and one out of its range, through `deltatune train`: exit 2, one line on stderr that names the
field and says what it accepts, no traceback, and nothing read or loaded before the refusal.

The cases are a table by field name; the fields come from `dataclasses.fields`, so a field added
without a case makes `test_every_config_field_has_a_case` fail."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import deltatune
import deltatune.train.loop
from deltatune.registry import get_method, registered_methods
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from training_fixtures import task_config


@dataclasses.dataclass(frozen=True)
class Case:
    """Bad values for one field, as override text (YAML)."""

    accepts: str
    """What the error must say the field accepts: `FIELD must be ACCEPTS, got ...`."""
    wrong_type: str
    """A value of a type the field does not take."""
    out_of_range: tuple[str, ...] = ()
    """Values of a type the field takes, that it refuses."""
    range_message: str | None = None
    """The error for `out_of_range` when the refusal is a rule of its own (an unknown name, say)."""


TRAIN_FIELDS: dict[str, Case] = {
    "model": Case("a string", "[a, b]", ('""',), "the config needs `model`"),
    "task": Case("a string", "5", ("classify",), "unknown task 'classify'"),
    "train_file": Case(
        "a string, a path or an iterable of mappings", "[1, 2]", ('""',), "the config needs `train_file`"
    ),
    "eval_file": Case("a string, a path, an iterable of mappings or null", "5"),
    "columns": Case("a mapping of strings to strings or null", "{sentence: 1}"),
    "header": Case("true or false", '"false"'),
    "column_names": Case("a list of strings or null", "[1, 2]", ("[text, label]",), "column_names names the columns"),
    "separator": Case("a non-empty string without line breaks or null", "5", ('""',)),
    "max_train_examples": Case("a whole number ≥ 1 or null", '"10"', ("0",)),
    "max_eval_examples": Case("a whole number ≥ 1 or null", "[5]", ("-1",)),
    "adapter": Case("a mapping", "lora", ("{r: 4}",), "`adapter` must be a mapping with a `method` key"),
    "tokenizer": Case("a string or null", "[a]"),
    "quantize": Case("a string or null", "[nf4]", ("nf3",), "unknown quantize 'nf3'"),
    "output_dir": Case("a string", "5"),
    "overwrite_output_dir": Case("true or false", '"false"'),
    "max_length": Case("a whole number ≥ 1", '"10"', ("0",)),
    "packing": Case("true or false", '"false"'),
    "group_by_length": Case("true or false", '"false"'),
    "chat_template": Case("true or false", '"false"'),
    "system_prompt": Case("a string or null", "{a: b}"),
    "epochs": Case("a number > 0", "[1]", ("-1", "0")),
    "max_steps": Case("a whole number ≥ 1 or null", '"10"', ("-5", "0")),
    "batch_size": Case("a whole number ≥ 1", "true", ("0",)),
    "gradient_accumulation_steps": Case("a whole number ≥ 1", "1.5", ("0",)),
    "learning_rate": Case("a number > 0 or null", "fast", (".inf", ".nan", "0", "-1e-3")),
    "head_learning_rate": Case("a number > 0 or null", "fast", (".inf", "0", "-1e-3")),
    "weight_decay": Case("a number ≥ 0", "[0.1]", ("-0.1",)),
    "loraplus_lr_ratio": Case("a number > 0 or null", "fast", ("0", "-16", ".nan")),
    "loraplus_lr_embedding": Case("a number > 0", "[1e-6]", ("0", "-1e-6")),
    "freeze_lora_a": Case("true or false", '"false"'),
    "warmup_steps": Case("a whole number ≥ 0 or null", '"5"', ("-1",)),
    "warmup_ratio": Case("a number in [0, 1] or null", "[0.1]", ("-0.1", "1.5")),
    "scheduler": Case("a string or null", "5", ("warmup",), "unknown scheduler 'warmup'"),
    "max_grad_norm": Case("a number > 0 or null", "yes", ("-1", "0")),
    "seed": Case("a whole number in [0, 4294967295]", '"0"', ("-1", "4294967296")),
    "gradient_checkpointing": Case("true or false", '"false"'),
    "lean_gated_mlp": Case("true or false", '"true"'),
    "loss_chunk_rows": Case("a whole number ≥ 1 or null", "[256]", ("0", "-8")),
    "bf16": Case('true, false or "auto"', '"false"', ('"on"',)),
    "eval_every": Case("a whole number ≥ 1 or null", '"10"', ("0",)),
    "save_every": Case("a whole number ≥ 1 or null", '"10"', ("-1",)),
    "save_total_limit": Case("a whole number ≥ 1 or null", '"2"', ("0",)),
    "log_every": Case("a whole number ≥ 1", "[1]", ("0",)),
    "report_to": Case("a string or a list of strings", "5", ("[wandb, tensorbord]",), "unknown report_to 'tensorbord'"),
    "max_new_tokens": Case("a whole number ≥ 1", "1.5", ("-1",)),
    "eval_batch_size": Case("a whole number ≥ 1", "true", ("0",)),
    "threads": Case("a whole number in [1, 4096] or null", '"2"', ("0", "4097")),
    "release_freed_memory": Case("true or false", '"true"'),
    "device": Case(
        "a string", "0", ("gpu", "cuda:x"), "device must be cpu, cuda, cuda:N (N a device number), mps or auto"
    ),
    "data_parallel": Case('"ddp" or "fsdp"', "5", ("zero",)),
}

ADAPTER_FIELDS: dict[str, Case] = {
    # every method
    "modules_to_save": Case("a list of strings, a string or null", "5"),
    # methods that pick modules
    "target_modules": Case("a list of strings, a regular expression or null", "5", ('"(["',)),
    "exclude_modules": Case("a list of strings, a regular expression or null", "{a: b}", ('"q_proj)"',)),
    "layers_to_transform": Case("a list of whole numbers ≥ 0, a whole number ≥ 0 or null", '"1"', ("-1", "[0, -1]")),
    "layers_pattern": Case("a list of strings, a string or null", "5"),
    # LoRA
    "r": Case("a whole number ≥ 1", "1.5", ("0", "-2")),
    "lora_alpha": Case("a number", "sixteen", (".nan", ".inf")),
    "lora_dropout": Case("a number in [0, 1)", "[0.1]", ("1", "-0.1")),
    "use_rslora": Case("true or false", '"false"'),
    "use_dora": Case("true or false", '"false"'),
    "target_parameters": Case("a list of strings or null", "lin0.weight"),
    "init_lora_weights": Case(
        'true, false, "gaussian", "orthogonal", "pissa", "olora", "eva", "corda", "loftq", "mica" or '
        '"pissa_niter_<iterations>"',
        "1",
        ("lora_ga",),
    ),
    "kasa_config": Case("a KasaConfig, a mapping or null", "5", ("{beta: -1}", "{delta: 1}"), "kasa_config"),
    "corda_config": Case(
        "a CordaConfig, a mapping or null", "5", ("{cache_file: x.pt}", "{corda_method: svd}"), "corda_"
    ),
    "use_bdlora": Case(
        "a BdLoraConfig, a mapping or null", "5", ("{nblocks: 0}", "{blocks: 2}", "{nblocks: two}"), "use_bdlora"
    ),
    "eva_config": Case("a EvaConfig, a mapping or null", "5", ("{tau: 0.9}", "{rho: 0.5}"), "eva_config "),
    "velora_config": Case(
        "a VeloraConfig, a mapping or null",
        "5",
        ("{num_groups: 0}", "{init_type: mean}", "{groups: 2}"),
        "velora_config",
    ),
    "monteclora_config": Case(
        "a MontecloraConfig, a mapping or null",
        "5",
        ("{num_samples: 0}", "{dirichlet_prior: 0}", "{samples: 2}"),
        "monteclora_config",
    ),
    "rank_pattern": Case(
        "a mapping of regular expressions to whole numbers ≥ 1", "[q_proj]", ("{q_proj: 0}", '{"(": 2}')
    ),
    "alpha_pattern": Case("a mapping of regular expressions to numbers", "{q_proj: high}", ("{q_proj: .inf}",)),
    # AdaLoRA
    "target_r": Case("a whole number ≥ 1", "1.5", ("0",)),
    "init_r": Case("a whole number ≥ 1", '"4"', ("0",)),
    "tinit": Case("a whole number ≥ 0", "1.5", ("-1",)),
    "tfinal": Case("a whole number ≥ 0", "[1]", ("-1",)),
    "deltaT": Case("a whole number ≥ 1", "true", ("0",)),
    "beta1": Case("a number in (0, 1)", "high", ("1", "0")),
    "beta2": Case("a number in (0, 1)", "[0.8]", ("1.5",)),
    "orth_reg_weight": Case("a number ≥ 0", "strong", ("-0.5",)),
    "total_step": Case("a whole number ≥ 1 or null", '"10"', ("0",)),
    "lora_bias": Case("true or false", '"false"'),
    "bias": Case('"none", "all" or "lora_only"', "5", ("some",)),
    "trainable_token_indices": Case(
        "a list of whole numbers ≥ 0, a mapping of strings to lists or null", "5", ("[-1]", "{embed_tokens: [-1]}")
    ),
    # trainable tokens (`method.field`: where a field of that name in another method takes other values)
    "token_indices": Case("a list of whole numbers ≥ 0", "5", ("[-1]",)),
    "trainable_tokens.init_weights": Case("true or false", '"yes"'),
    "vera.init_weights": Case("true or false", '"false"'),
    "loha.init_weights": Case("true or false", '"yes"'),
    "oft.r": Case("a whole number ≥ 0", "1.5", ("-1",)),
    "oft.init_weights": Case("true or false", '"true"'),
    "lokr.init_weights": Case('true, false or "lycoris"', "1", ('"kaiming"',)),
    "adalora.rank_pattern": Case(
        "a mapping of strings to lists or null", "[q_proj]", ("{q_proj: [1, 0]}",), "rank_pattern must be a mapping"
    ),
    "adalora.init_lora_weights": Case("true or false", '"gaussian"'),
    # BitFit
    "add_missing_bias": Case("true or false", '"false"'),
    # IA3
    "feedforward_modules": Case("a list of strings, a regular expression or null", "5", ('"(["',)),
    "init_ia3_weights": Case("true or false", '"false"'),
    # bottleneck adapters and Compacter
    "preset": Case("a string", "5", ("big",), "unknown bottleneck preset 'big'"),
    "attention_adapter": Case("true, false or null", '"false"'),
    "ffn_adapter": Case("true, false or null", "0"),
    "parallel": Case("true, false or null", '"no"'),
    "original_ln_before": Case("true, false or null", "[true]"),
    "reduction_factor": Case("a number > 0 or null", "[16]", ("0", "-2")),
    "bottleneck_size": Case("a whole number ≥ 1 or null", "1.5", ("0",)),
    "non_linearity": Case("a string or null", "5", ("sparkle",), "unknown non_linearity 'sparkle'"),
    "scaling": Case("a number or null", "[1]", (".inf",)),
    "init_weights": Case("a string or null", "5", ("xavier",), "init_weights must be one of"),
    "dropout": Case("a number in [0, 1)", "low", ("1.5", "-0.5")),
    "leave_out": Case("a list of whole numbers ≥ 0", "3", ("[-1]",)),
    "architecture": Case(
        "a mapping of strings to strings or null", "[blocks]", ("{nonsense: x}",), "unknown keys ['nonsense']"
    ),
    "linear": Case("a string", "5", ("dense",), "linear must be one of"),
    "phm_dim": Case("a whole number ≥ 1", "1.5", ("0",)),
    "phm_rank": Case("a whole number ≥ 1", '"1"', ("0",)),
    "phm_init_range": Case("a number ≥ 0", "[1]", ("-1",)),
    # LoHa and LoKr
    "alpha": Case("a number", "sixteen", (".nan", ".inf")),
    "rank_dropout": Case("a number in [0, 1)", "[0.1]", ("1", "-0.1")),
    "module_dropout": Case("a number in [0, 1)", "high", ("1.5", "-0.5")),
    "use_effective_conv2d": Case("true or false", '"false"'),
    "decompose_both": Case("true or false", '"false"'),
    "decompose_factor": Case("a whole number", "1.5", ("0", "-2"), "decompose_factor must be -1 or a whole number ≥ 1"),
    "rank_dropout_scale": Case("true or false", '"false"'),
    # fusion
    "adapters": Case("a list of strings", "a", ("[a]", "[a, a]"), "a fusion needs two or more distinct adapter names"),
    # soft prompts
    "num_virtual_tokens": Case("a whole number ≥ 1", "1.5", ("0",)),
    "prompt_tuning_init": Case("a string", "5", ("zeros",), "prompt_tuning_init must be one of"),
    "prompt_tuning_init_text": Case("a string or null", "[a]"),
    "tokenizer_name_or_path": Case("a string or null", "5"),
    "tokenizer_kwargs": Case("a mapping or null", "[a]"),
    "encoder_reparameterization_type": Case(
        "a string", "5", ("GRU",), "encoder_reparameterization_type must be one of"
    ),
    "encoder_hidden_size": Case("a whole number ≥ 1 or null", "1.5", ("0",)),
    "encoder_num_layers": Case("a whole number ≥ 1", "1.5", ("0",)),
    "encoder_dropout": Case("a number in [0, 1)", "[0]", ("1",)),
    "prefix_projection": Case("true or false", '"false"'),
    "embedding_dim": Case('a whole number ≥ 1, "hidden_size" or null', "big", ("0",)),
    "shift_positions": Case("true or false", '"false"'),
    "encoder_prefix": Case("true or false", '"true"'),
    "cross_prefix": Case("true or false", '"true"'),
    # MAM: its parts, each a config or a mapping of changes to AdapterHub's MAM defaults
    "mam.prefix_tuning": Case("a PrefixTuningConfig, a mapping or null", "5"),
    "mam.adapter": Case("a BottleneckConfig, a mapping or null", "5"),
    # UniPELT: its parts as MAM's, and LoRA; the gates of each part
    "unipelt.prefix_tuning": Case("a PrefixTuningConfig, a mapping or null", "5"),
    "unipelt.adapter": Case("a BottleneckConfig, a mapping or null", "5"),
    "unipelt.lora": Case("a LoraConfig, a mapping or null", "5"),
    "use_gating": Case("true or false", '"true"'),
    "fused_slices": Case(
        "a mapping of regular expressions to lists", "[c_attn]", ("{c_attn: [false, false]}",), "enables no part"
    ),
    "shared_gating": Case("true or false", '"true"'),
    # VeRA
    "projection_prng_key": Case(
        "a whole number in [-9223372036854775808, 18446744073709551615]", "1.5", ("18446744073709551616",)
    ),
    "save_projection": Case("true or false", '"false"'),
    "vera_dropout": Case("a number in [0, 1)", "[0.1]", ("1", "-0.1")),
    "d_initial": Case("a number", "small", (".nan",)),
    # OFT
    "oft_block_size": Case("a whole number ≥ 0", "1.5", ("-1",)),
    "coft": Case("true or false", '"false"'),
    "eps": Case("a number > 0", "[1]", ("0",)),
    "block_share": Case("true or false", "1"),
    "use_cayley_neumann": Case("true or false", '"yes"'),
    "num_cayley_neumann_terms": Case("a whole number ≥ 1", "1.5", ("0",)),
    # ReFT
    "layers": Case('"all" or a list of whole numbers ≥ 0', "5", ("[-1]", '"some"')),
    "prefix_positions": Case("a whole number ≥ 0", "1.5", ("-1",)),
    "suffix_positions": Case("a whole number ≥ 0", '"2"', ("-3",)),
    "orthogonality": Case("true or false", '"yes"'),
    "tied_weights": Case("true or false", "1"),
    "subtract_projection": Case("true or false", '"no"'),
    "init_weights_seed": Case("a whole number or null", "1.5"),
}


METHOD_BASES: dict[str, str] = {
    "adalora": "{method: adalora, init_r: 4, target_r: 2}",
    "lora": "{method: lora, r: 4, target_modules: all-linear}",
    "bitfit": "{method: bitfit}",
    "ia3": "{method: ia3}",
    "ln_tuning": "{method: ln_tuning}",
    "bottleneck": "{method: bottleneck}",
    "compacter": "{method: compacter}",
    "fusion": "{method: fusion, adapters: [a, b]}",
    "prompt_tuning": "{method: prompt_tuning}",
    "p_tuning": "{method: p_tuning}",
    "prefix_tuning": "{method: prefix_tuning}",
    "mam": "{method: mam}",
    "unipelt": "{method: unipelt}",
    "vera": "{method: vera, r: 4, target_modules: all-linear}",
    "trainable_tokens": "{method: trainable_tokens, token_indices: [3, 4]}",
    "loha": "{method: loha, target_modules: all-linear}",
    "lokr": "{method: lokr, target_modules: all-linear}",
    "oft": "{method: oft, oft_block_size: 8, target_modules: all-linear}",
    "full": "{method: full}",
    "reft": "{method: reft}",
}
"""A valid `adapter` section per built-in method, which the cases then spoil one field at a time."""


def adapter_case(method: str, name: str) -> Case | None:
    """The case of field `name` of `method`'s config: its own (`method.name`) where it has one."""
    return ADAPTER_FIELDS.get(f"{method}.{name}", ADAPTER_FIELDS.get(name))


def built_in_methods() -> list[str]:
    return [name for name in registered_methods() if type(get_method(name)).__module__.startswith("deltatune.")]


def field_names(config_class: type) -> list[str]:
    return [field.name for field in dataclasses.fields(config_class)]


def cases() -> list:
    """(overrides, expected line) for every bad value of every field that has a case."""
    found = []
    for name in field_names(TrainConfig):
        for kind, value, message in _bad_values(name, TRAIN_FIELDS.get(name), ""):
            found.append(pytest.param([f"{name}={value}"], message, id=f"train-{name}-{kind}"))
    for method, base in METHOD_BASES.items():
        for name in field_names(get_method(method).config_class):
            for kind, value, message in _bad_values(name, adapter_case(method, name), "adapter: "):
                found.append(
                    pytest.param([f"adapter={base}", f"adapter.{name}={value}"], message, id=f"{method}-{name}-{kind}")
                )
    return found


def _bad_values(name: str, case: Case | None, prefix: str) -> list[tuple[str, str, str]]:
    """(kind, override value, expected part of the error) for each bad value of the case."""
    if case is None:
        return []
    expected = f"{prefix}{name} must be {case.accepts}, got "
    bad = [("wrong-type", case.wrong_type, expected)]
    bad += [
        (f"out-of-range-{index}", value, case.range_message or expected)
        for index, value in enumerate(case.out_of_range)
    ]
    return bad


@pytest.fixture(scope="module")
def valid_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return task_config(tmp_path_factory.mktemp("fields"), "causal-lm")


@pytest.fixture
def nothing_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading data or loading a tokenizer or model fails the test: the refusal must come first."""

    def loaded(*arguments, **keywords):
        raise AssertionError("data or a model was loaded before the config was refused")

    for name in ("read_records", "load_tokenizer", "load_model"):
        monkeypatch.setattr(deltatune.train.loop, name, loaded)


def test_every_config_field_has_a_case() -> None:
    """A field without a case, or with a declared range and no out-of-range value, is an untested field."""
    from deltatune.field_check import Range, field_types

    assert sorted(built_in_methods()) == sorted(METHOD_BASES)
    classes = [
        (TrainConfig, TRAIN_FIELDS.get),
        *(
            (get_method(method).config_class, lambda name, method=method: adapter_case(method, name))
            for method in METHOD_BASES
        ),
    ]
    missing, unranged = [], []
    for config_class, case_of in classes:
        for name, annotation in field_types(config_class).items():
            if case_of(name) is None:
                missing.append(f"{config_class.__name__}.{name}")
            elif _declares_range(annotation, Range) and not case_of(name).out_of_range:
                unranged.append(f"{config_class.__name__}.{name}")
    assert not missing, f"fields without a case in the table: {missing}"
    assert not unranged, f"fields with a range but no out-of-range case: {unranged}"


def _declares_range(annotation: typing.Any, range_class: type) -> bool:
    if typing.get_origin(annotation) is typing.Annotated and any(
        isinstance(limit, range_class) for limit in annotation.__metadata__
    ):
        return True
    return any(_declares_range(argument, range_class) for argument in typing.get_args(annotation))


def test_every_method_base_is_a_valid_config(valid_config: Path) -> None:
    """The cases spoil a valid adapter section, so each refusal comes from the spoiled field."""
    for method, base in METHOD_BASES.items():
        assert TrainConfig.from_yaml(valid_config, [f"adapter={base}"]).adapter_config().method == method


@pytest.mark.parametrize(("overrides", "message"), cases())
def test_bad_field_value_exits_2_with_one_line_naming_the_field(
    overrides: list[str], message: str, valid_config: Path, nothing_loaded: None, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["train", str(valid_config), "--quiet", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltatune: "), err
    assert message in err, err


SHELL_OVERRIDES = ['max_steps="10"', 'adapter.lora_alpha="high"', "adapter.target_modules=(["]
"""Overrides as a shell passes them: a quoted number, a quoted word for a number, an unquoted pattern that
does not compile."""


@pytest.mark.parametrize("override", SHELL_OVERRIDES)
def test_bad_field_value_as_the_shell_passes_it_exits_2_with_one_line(
    override: str, valid_config: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["train", str(valid_config), "--quiet", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltatune: ") and "must be" in err, err


def test_bad_field_value_from_the_shell_ends_without_traceback(valid_config: Path) -> None:
    """The command as a process of its own (its exit status, all it writes to stderr, imports included),
    on one of `SHELL_OVERRIDES`: the others take the same path through `main`, checked in-process above;
    each process would only pay the imports again (~5 s)."""
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.train.cli", "train", str(valid_config), "--quiet", SHELL_OVERRIDES[-1]],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltatune: ") and "must be" in lines[0], done.stderr
