"""LoHa and LoKr beyond the outputs: tensor names, shapes and zero factors for every peft init, peft's
dimension split, where the factored product is taken, rank and module dropout in training, training
through the command, and the config keys (the cross-checks of outputs are in test_lycoris.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization

import deltatune
from deltatune import peft_keys
from deltatune.methods.lokr import kronecker_factors
from test_lycoris import (
    CONFIGS,
    CONV_OPTIONS,
    CONV_TARGETS,
    LINEAR_OPTIONS,
    assert_changed,
    assert_same,
    conv_base,
    options_id,
    our_config,
    peft_config,
    peft_model,
)
from tiny_models import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ----------------------------------------------------------------------------- shapes, names, init
SHAPE_CASES = [
    pytest.param(model_kind, method, options, init, id=f"{model_kind}-{method}-{options_id(options)}-init={init}")
    for model_kind, cases in (("llama", LINEAR_OPTIONS), ("conv", CONV_OPTIONS))
    for method, options in cases
    for init in (True, False, "lycoris")
    if not (init == "lycoris" and method == "loha")  # LoKr's only
]


@pytest.mark.parametrize("model_kind,method,options,init", SHAPE_CASES)
def test_tensor_names_shapes_and_zero_factors_match_peft(model_kind: str, method: str, options: dict, init) -> None:
    """Every init peft has gives the same tensors (names, shapes) as here, and zeros the same ones."""
    model, targets = (conv_base(), CONV_TARGETS) if model_kind == "conv" else (build("llama"), "all-linear")
    options = {**options, "init_weights": init}
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config(method, targets, **options))
    ours = deltatune.attach(copy.deepcopy(model), our_config(method, targets, **options))
    prefix = "base_model.model."
    peft_tensors = {key[len(prefix) :]: tensor for key, tensor in peft.get_peft_model_state_dict(theirs).items()}
    our_tensors = {
        f"{name}.{tensor_name}": tensor
        for name, site in ours.sites()
        for tensor_name, tensor in site.adapters["default"].file_state().items()
    }
    assert {key: tuple(t.shape) for key, t in our_tensors.items()} == {
        key: tuple(t.shape) for key, t in peft_tensors.items()
    }
    assert {key for key, t in our_tensors.items() if not t.any()} == {
        key for key, t in peft_tensors.items() if not t.any()
    }


@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8, 16])
def test_kronecker_factors_match_peft_factorization(factor: int) -> None:
    assert [kronecker_factors(dimension, factor) for dimension in range(1, 300)] == [
        factorization(dimension, factor) for dimension in range(1, 300)
    ]


@pytest.mark.parametrize(
    "method,rank,model_kind,target,factored",
    [
        ("loha", 2, "llama", "model.layers.0.self_attn.q_proj", True),  # r² (in + out) = 256 < in · out = 1024
        ("loha", 4, "llama", "model.layers.0.self_attn.q_proj", False),  # 1024: exactly even
        ("loha", 2, "mlp", "net.0", True),  # 16 → 32: 192 < 512
        ("lokr", 2, "llama", "model.layers.0.self_attn.q_proj", True),  # out_k (in + out_l in_m) = 8 · 48 < 1024
        ("lokr", 2, "conv", "head", False),  # prime out: 7 · (124 + 4) = 896 > 868
        ("loha", 2, "conv", "conv2", False),  # convolutions make ΔW
    ],
)
def test_the_factored_product_is_taken_exactly_where_it_costs_less(
    method: str, rank: int, model_kind: str, target: str, factored: bool
) -> None:
    model = conv_base() if model_kind == "conv" else build(model_kind)
    ours = deltatune.attach(model, our_config(method, [target], r=rank))
    assert dict(ours.sites())[target].adapters["default"].factored is factored


# ----------------------------------------------------------------------------- training
def test_rank_dropout_drops_the_rows_peft_drops_for_the_same_draws() -> None:
    """With the same generator state, peft's ΔW with rank dropout and ours drop the same output features
    and rescale them the same way (LoHa always, LoKr with rank_dropout_scale)."""
    for method, options in [("loha", {}), ("lokr", {"rank_dropout_scale": True}), ("lokr", {})]:
        base = build("llama")
        theirs = peft_model(base, peft_config(method, ["q_proj"], r=2, rank_dropout=0.5, **options))
        ours = deltatune.attach(copy.deepcopy(base), our_config(method, ["q_proj"], r=2, rank_dropout=0.5, **options))
        name = "model.layers.0.self_attn.q_proj"
        layer, adapter = theirs.base_model.model.get_submodule(name), dict(ours.sites())[name].adapters["default"]
        for tensor_name, tensor in adapter.file_state().items():
            getattr(layer, tensor_name)["default"].data.copy_(tensor)
        x = torch.randn(3, 5, 32)
        adapter.train()
        for seed in range(4):
            torch.manual_seed(seed)
            expected = torch.nn.functional.linear(x, layer.get_delta_weight("default", apply_rank_dropout=True))
            torch.manual_seed(seed)
            assert_same(adapter.delta_output(ours.base_model.get_submodule(name), x), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_module_dropout_skips_whole_calls_in_training_only(method: str) -> None:
    model = deltatune.attach(build("llama"), our_config(method, ["q_proj"], r=2, module_dropout=0.5))
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 32)
    plain = torch.nn.functional.linear(x, layer.weight)  # Llama's projections have no bias
    model.eval()
    adapted = layer(x)
    assert_changed(adapted, plain)
    assert all(torch.equal(layer(x), adapted) for _ in range(10))
    model.train()
    torch.manual_seed(0)
    outputs = [layer(x) for _ in range(40)]
    skipped = sum(torch.equal(output, plain) for output in outputs)
    kept = sum(torch.equal(output, adapted) for output in outputs)
    assert skipped + kept == 40 and 5 < skipped < 35


@pytest.mark.parametrize("method", CONFIGS)
def test_training_through_the_command_lowers_the_loss(method: str, tmp_path: Path) -> None:
    from deltatune.train.cli import main
    from training_fixtures import task_config

    adapter = {"method": method, "r": 2, "alpha": 4, "target_modules": "all-linear"}
    assert main(["train", str(task_config(tmp_path, "causal-lm", method=adapter)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    trained = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert trained[-1] < trained[0]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == method


# ----------------------------------------------------------------------------- config keys
@pytest.mark.parametrize(
    "config_class,read", [(peft.LoHaConfig, peft_keys.LYCORIS_READ), (peft.LoKrConfig, peft_keys.LOKR_READ)]
)
def test_every_peft_key_is_read(config_class, read) -> None:
    unclassified = {field.name for field in dataclasses.fields(config_class)} - {*peft_keys.COMMON_TOLERATED, *read}
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"
    ours = CONFIGS["loha" if config_class is peft.LoHaConfig else "lokr"][1]
    assert set(read) <= {field.name for field in dataclasses.fields(ours)}


def test_a_decompose_factor_peft_would_misread_is_refused() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="decompose_factor must be -1 or a whole number"):
        deltatune.LoKrConfig(decompose_factor=0)
