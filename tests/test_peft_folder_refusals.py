"""A peft folder loads only if deltatune computes what peft computes with it; otherwise a clear error
names the key (or the init) that deltatune does not implement.

Folders are made by peft itself on a tiny Llama; keys peft cannot set up on a tiny model without extra
machinery (Megatron, GPTQ, a data set) are written into the `adapter_config.json` of a plain adapter,
as a folder from that setup would hold them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from tiny_models import build, run

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def perturbed_lora_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))


def peft_folder(folder: Path, **options) -> tuple[torch.nn.Module, torch.Tensor]:
    """A trained-looking peft LoRA adapter on the tiny Llama, saved in `folder`; the base and peft's output."""
    base = build("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), **options)
    )
    perturbed_lora_weights(theirs)
    theirs.save_pretrained(str(folder))
    return base, run(theirs.eval(), "llama")


def with_config_keys(folder: Path, **keys) -> Path:
    """`folder` with `keys` written into its adapter_config.json."""
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **keys}))
    return folder


def assert_loads_with_peft_outputs(base: torch.nn.Module, folder: Path, expected: torch.Tensor) -> None:
    ours = deltatune.load(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(run(ours, "llama"), expected, atol=ATOL, rtol=0)
    assert (expected - run(base, "llama")).abs().max() > 1e-3


# ----------------------------------------------------------------------------- every key has a place
def test_every_peft_lora_key_is_read_tolerated_or_refused() -> None:
    from deltatune import peft_keys

    classes = [
        set(peft_keys.COMMON_TOLERATED),
        set(peft_keys.LORA_READ),
        set(peft_keys.LORA_TOLERATED),
        set(peft_keys.LORA_REFUSED),
    ]
    unclassified = {field.name for field in dataclasses.fields(peft.LoraConfig)} - set().union(*classes)
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"
    assert sum(map(len, classes)) == len(set().union(*classes)), "a key is in two classes"


def test_every_peft_trainable_tokens_key_is_read_or_tolerated() -> None:
    from deltatune import peft_keys

    known = {*peft_keys.COMMON_TOLERATED, *peft_keys.TRAINABLE_TOKENS_READ}
    unclassified = {field.name for field in dataclasses.fields(peft.TrainableTokensConfig)} - known
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"


@pytest.mark.parametrize(
    "config_class",
    [peft.PromptTuningConfig, peft.PromptEncoderConfig, peft.PrefixTuningConfig],
    ids=lambda c: c.__name__,
)
def test_every_peft_soft_prompt_key_is_read_or_tolerated(config_class) -> None:
    from deltatune import peft_keys

    known = {*peft_keys.COMMON_TOLERATED, *peft_keys.SOFT_PROMPT_READ, *peft_keys.SOFT_PROMPT_TOLERATED}
    unclassified = {field.name for field in dataclasses.fields(config_class)} - known
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"


@pytest.mark.parametrize("config_class", [peft.IA3Config, peft.LNTuningConfig], ids=lambda c: c.__name__)
def test_every_peft_ia3_and_ln_tuning_key_is_read_or_tolerated(config_class) -> None:
    from deltatune import peft_keys

    known = {*peft_keys.COMMON_TOLERATED, *peft_keys.IA3_READ, *peft_keys.IA3_TOLERATED, *peft_keys.LN_TUNING_READ}
    unclassified = {field.name for field in dataclasses.fields(config_class)} - known
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"


# ----------------------------------------------------------------------------- initialisations
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_adapter_whose_init_is_recomputed_from_the_base_loads_with_peft_outputs(
    init: str, tmp_path: Path
) -> None:
    """peft recomputes PiSSA's (full SVD) and OLoRA's (QR) residual base from the original base when it
    loads such a folder; deltatune recomputes the same initial term (trained folders: test_lora_inits)."""
    base, expected = peft_folder(tmp_path, init_lora_weights=init)
    assert_loads_with_peft_outputs(base, tmp_path, expected)


@pytest.mark.parametrize(("init", "why"), [("pissa_niter_4", "randomized SVD"), ("corda", "from data")])
def test_an_adapter_whose_base_was_rewritten_by_a_draw_or_from_data_is_refused_by_name(
    init: str, why: str, tmp_path: Path
) -> None:
    """Their residual base is no function of the original base alone (CorDA needs data to set up: its
    folder differs from a plain one only by the key)."""
    if init == "corda":
        base, _ = peft_folder(tmp_path)
        with_config_keys(tmp_path, init_lora_weights=init)
    else:
        base, _ = peft_folder(tmp_path, init_lora_weights=init)
    with pytest.raises(
        deltatune.DeltaTuneError,
        match=rf"init_lora_weights='{init}'.*rewrites the base.*{why}.*path_initial_model_for_weight_conversion",
    ):
        deltatune.load(copy.deepcopy(base), str(tmp_path))


@pytest.mark.parametrize("init", ["lora_ga", "loftq", "some_future_init"])
def test_an_init_deltatune_cannot_reproduce_is_refused_by_name(init: str, tmp_path: Path) -> None:
    """Inits that need data or quantization to set up: their folders differ from a plain one only by the key."""
    base, _ = peft_folder(tmp_path)
    with pytest.raises(deltatune.DeltaTuneError, match=rf"init_lora_weights='{init}'.*does not implement"):
        deltatune.load(copy.deepcopy(base), str(with_config_keys(tmp_path, init_lora_weights=init)))


def test_a_pissa_adapter_converted_by_peft_loads_with_peft_outputs(tmp_path: Path) -> None:
    """The refusal's advice works: peft's conversion gives a plain LoRA adapter of the same function."""
    base = build("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights="pissa")
    )
    theirs.save_pretrained(str(tmp_path / "initial"))
    perturbed_lora_weights(theirs)
    expected = run(theirs.eval(), "llama")
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    assert_loads_with_peft_outputs(base, tmp_path / "converted", expected)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "mica"])
def test_an_init_that_leaves_the_base_alone_loads_with_peft_outputs(init, tmp_path: Path) -> None:
    base, expected = peft_folder(tmp_path, init_lora_weights=init)
    assert_loads_with_peft_outputs(base, tmp_path, expected)


def test_an_eva_adapter_loads_with_peft_outputs(tmp_path: Path) -> None:
    """EVA initialises A from data and leaves the base alone: the saved weights are the adapter."""
    base, expected = peft_folder(tmp_path)
    assert_loads_with_peft_outputs(
        base, with_config_keys(tmp_path, init_lora_weights="eva", eva_config={"rho": 2.0}), expected
    )


# ----------------------------------------------------------------------------- keys
REFUSED_VALUES = {
    "layer_replication": [[0, 2], [1, 2]],
    "megatron_config": {"tensor_model_parallel_size": 1},
    "use_qalora": True,
    "alora_invocation_tokens": [5, 6],
    "arrow_config": {"top_k": 2},
    "ensure_weight_tying": True,
}


def test_the_refusal_table_has_a_case_for_every_refused_key() -> None:
    from deltatune import peft_keys

    assert set(REFUSED_VALUES) == set(peft_keys.LORA_REFUSED)


@pytest.mark.parametrize("key", sorted(REFUSED_VALUES))
def test_a_key_that_changes_the_math_is_refused_by_name(key: str, tmp_path: Path) -> None:
    base, _ = peft_folder(tmp_path)
    folder = with_config_keys(tmp_path, **{key: REFUSED_VALUES[key]})
    with pytest.raises(deltatune.DeltaTuneError, match=rf"sets {key}=.*deltatune does not implement"):
        deltatune.load(copy.deepcopy(base), str(folder))


@pytest.mark.parametrize(
    "options",
    [
        {"bias": "lora_only"},
        {"bias": "all"},
        {"lora_bias": True},
        {"trainable_token_indices": [3, 4]},
        {"use_bdlora": {"target_modules_bd_a": ["v_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}},
        {"velora_config": {"num_groups": 2, "init_type": "random"}},
        {"monteclora_config": {"num_samples": 2}},
    ],
    ids=lambda options: "-".join(f"{key}={value}" for key, value in options.items()),
)
def test_a_key_deltatune_now_computes_loads_with_peft_outputs(options: dict, tmp_path: Path) -> None:
    """Once refused, these load (their cross-checks: test_lora_bias.py, test_trainable_tokens.py,
    test_lora_bdlora.py, test_lora_velora.py, test_lora_monteclora.py)."""
    base, expected = peft_folder(tmp_path, **options)
    assert_loads_with_peft_outputs(base, tmp_path, expected)


def test_keys_that_do_not_change_the_math_stay_accepted(tmp_path: Path) -> None:
    base, expected = peft_folder(tmp_path)
    harmless = {
        "fan_in_fan_out": True,
        "megatron_core": "my.megatron",
        "loftq_config": {"loftq_bits": 4},
        "qalora_group_size": 8,
        "revision": "v1",
        "inference_mode": False,
        "target_parameters": [],
        "layer_replication": None,
        "bias": "none",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_loads_with_peft_outputs(base, with_config_keys(tmp_path, **harmless), expected)


def test_a_key_peft_0_21_does_not_have_warns_by_name(tmp_path: Path) -> None:
    base, expected = peft_folder(tmp_path)
    folder = with_config_keys(tmp_path, lora_future_option={"mode": "x"}, unused_flag=False)
    with pytest.warns(UserWarning, match=r"\['lora_future_option'\] are not keys of peft 0.21"):
        assert_loads_with_peft_outputs(base, folder, expected)
