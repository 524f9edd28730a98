"""VeRA against peft 0.21's VeRA: the same projections from the same key, the same outputs with the same
weights, folders in both directions (with and without the saved projections), merges, mixed batches with
LoRA, the projections stored once (in memory and on disk), and training through `deltatune train`.

Every adapter gets random, non-zero λ_b and λ_d (`perturb`), or it would add nothing and prove nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, UnsupportedModuleError
from deltatune.methods.vera import VeraLinear, VeraProjections
from deltatune.train.cli import main
from resume_checks import (
    RESUME_SETTINGS,
    assert_resume_equals_the_uninterrupted_run,
    assert_resume_with_a_switched_setting_is_refused,
)
from test_peft_crosscheck import assert_changed, assert_same, assert_same_parameter
from test_quantized import needs_bitsandbytes
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "bert": ["query", "value", "dense"],
}
ARCHS = list(TARGETS)


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random, non-zero λ_b and λ_d in either library's model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vera_lambda" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def peft_vera(arch: str, **options) -> peft.PeftModel:
    config = peft.VeraConfig(**{"r": 8, "target_modules": list(TARGETS[arch]), **options})
    theirs = peft.get_peft_model(copy.deepcopy(build(arch)), config)
    perturb(theirs)
    return theirs.eval()


def our_vera(arch: str, name: str = "default", seed: int = 0, **options) -> deltatune.DeltaModel:
    config = deltatune.VeraConfig(**{"r": 8, "target_modules": list(TARGETS[arch]), **options})
    ours = deltatune.attach(copy.deepcopy(build(arch)), config, name=name)
    perturb(ours, seed)
    return ours.eval()


def projections_of(ours: deltatune.DeltaModel) -> list[VeraProjections]:
    """Every pair the model holds, in module order."""
    return [module for module in ours.modules() if isinstance(module, VeraProjections)]


def vera_adapters(ours: deltatune.DeltaModel, name: str = "default") -> dict[str, VeraLinear]:
    return {module_name: site.adapters[name] for module_name, site in ours.sites() if name in site.adapters}


def file_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


# ----------------------------------------------------------------------------- projections
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("key", "rank"), [(0, 8), (1234, 16), (2**40 + 7, 5)])
def test_the_same_key_gives_peft_projections_bit_for_bit(arch: str, key: int, rank: int) -> None:
    theirs = peft_vera(arch, projection_prng_key=key, r=rank)
    ours = our_vera(arch, projection_prng_key=key, r=rank)
    [shared] = projections_of(ours)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])


def test_projections_are_sized_by_the_widest_target_and_sliced_per_layer() -> None:
    ours = our_vera("llama", init_weights=False)
    widths = {
        name: (m.in_features, m.out_features)
        for name, m in ours.base_model.named_modules()
        if name in ours.targets["default"]
    }
    [shared] = projections_of(ours)
    assert shared.vera_A.shape == (8, max(i for i, _ in widths.values()))
    assert shared.vera_B.shape == (max(o for _, o in widths.values()), 8)
    module_name, adapter = next((n, a) for n, a in vera_adapters(ours).items() if "v_proj" in n)
    x = torch.randn(3, widths[module_name][0])
    sliced_A = shared.vera_A[:, : widths[module_name][0]]
    sliced_B = shared.vera_B[: widths[module_name][1], :]
    expected = adapter.vera_lambda_b * ((adapter.vera_lambda_d * (x @ sliced_A.t())) @ sliced_B.t())
    torch.testing.assert_close(adapter.delta(x), expected, atol=1e-6, rtol=0)


def test_the_projections_are_held_once_and_move_and_cast_with_the_model() -> None:
    ours = our_vera("llama")
    [shared] = projections_of(ours)
    adapters = vera_adapters(ours)
    assert len(adapters) == 6 and all(adapter.shared[0] is shared for adapter in adapters.values())
    assert sum(key.endswith(("vera_A", "vera_B")) for key in ours.state_dict()) == 2
    assert not any(buffer.requires_grad for buffer in shared.buffers())
    copied = copy.deepcopy(ours)
    [copied_shared] = projections_of(copied)
    assert all(adapter.shared[0] is copied_shared for adapter in vera_adapters(copied).values())
    expected = run(ours, "llama").double()
    ours.double()
    assert all(adapter.shared[0].vera_A.dtype == torch.float64 for adapter in adapters.values())
    torch.testing.assert_close(run(ours, "llama"), expected, atol=1e-5, rtol=0)


def test_two_vera_adapters_keep_their_own_projections(tmp_path: Path) -> None:
    ours = our_vera("llama", name="a", projection_prng_key=1, r=8)
    ours.add("b", deltatune.VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=2))
    perturb(ours, seed=1)
    first, second = projections_of(ours)
    for adapter_name, shared, key, rank in (("a", first, 1, 8), ("b", second, 2, 4)):
        assert all(adapter.shared[0] is shared for adapter in vera_adapters(ours, adapter_name).values())
        config = peft.VeraConfig(
            r=rank, target_modules=list(ours.configs[adapter_name].target_modules), projection_prng_key=key
        )
        fresh = peft.get_peft_model(copy.deepcopy(build("llama")), config)
        assert torch.equal(shared.vera_A, fresh.base_model.vera_A["default"])
        assert torch.equal(shared.vera_B, fresh.base_model.vera_B["default"])
    ours.activate("a", "b")
    expected = run(ours, "llama")
    ours.save(tmp_path / "both")
    again = deltatune.load(build("llama"), tmp_path / "both").activate("a", "b").eval()
    assert torch.equal(run(again, "llama"), expected)


def test_two_adapters_with_one_key_and_rank_move_to_peft_and_back(tmp_path: Path) -> None:
    """The case peft supports (one key, one rank): each adapter, saved here, gives our outputs in peft,
    and peft's folders of both load here with peft's outputs."""
    ours = our_vera("llama", name="a", projection_prng_key=4)
    ours.add("b", deltatune.VeraConfig(r=8, target_modules=list(TARGETS["llama"]), projection_prng_key=4))
    perturb(ours, seed=1)
    expected = {}
    for name in ("a", "b"):
        ours.activate(name)
        expected[name] = run(ours, "llama")
    ours.save(tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(build("llama")), str(tmp_path / "ours" / "a"), adapter_name="a"
    )
    theirs.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    theirs.eval()
    for name in ("a", "b"):
        theirs.set_adapter(name)
        assert_same(run(theirs, "llama"), expected[name])
    theirs.save_pretrained(str(tmp_path / "theirs"))
    again = deltatune.load(build("llama"), tmp_path / "theirs").eval()
    assert_changed(expected["a"], expected["b"])
    for name in ("a", "b"):
        again.activate(name)
        assert_same(run(again, "llama"), expected[name])


# ----------------------------------------------------------------------------- outputs and folders
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_folder_loads_with_peft_outputs(arch: str, save_projection: bool, tmp_path: Path) -> None:
    theirs = peft_vera(arch, save_projection=save_projection, projection_prng_key=7)
    theirs.save_pretrained(tmp_path)
    assert ("base_model.vera_A" in file_keys(tmp_path)) is save_projection
    ours = deltatune.load(build(arch), tmp_path).eval()
    expected = run(theirs, arch)
    assert_changed(expected, run(build(arch), arch))
    assert_same(run(ours, arch), expected)


@pytest.mark.parametrize("save_projection", [True, False])
def test_a_peft_folder_on_chosen_layers_loads_with_peft_outputs(save_projection: bool, tmp_path: Path) -> None:
    """peft's `layers_to_transform` picks the same layers here, and the pair is sized by the chosen layers
    only (v_proj: 32 in, 16 out; the model's widest layer takes 64), as peft sizes it when it draws it again."""
    theirs = peft_vera(
        "llama",
        target_modules=["v_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        save_projection=save_projection,
    )
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(build("llama"), tmp_path).eval()
    assert ours.targets["default"] == ["model.layers.1.self_attn.v_proj"]
    [shared] = projections_of(ours)
    assert shared.vera_A.shape == (8, 32) and shared.vera_B.shape == (16, 8)
    assert_same(run(ours, "llama"), run(theirs, "llama"))


def test_peft_projections_in_the_file_are_the_ones_used(tmp_path: Path) -> None:
    """A saved pair wins over the key: a file whose pair is not the key's still gives peft's outputs."""
    theirs = peft_vera("llama", projection_prng_key=7)
    with torch.no_grad():
        theirs.base_model.vera_A["default"].mul_(-1.5)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(build("llama"), tmp_path).eval()
    assert_same(run(ours, "llama"), run(theirs, "llama"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_our_peft_folder_loads_in_peft_with_our_outputs(arch: str, save_projection: bool, tmp_path: Path) -> None:
    ours = our_vera(arch, save_projection=save_projection, projection_prng_key=11, vera_dropout=0.1)
    ours.save(tmp_path, format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "VERA" and data["fan_in_fan_out"] is (arch == "gpt2")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(build(arch)), str(tmp_path)).eval()
    expected = run(ours, arch)
    assert_changed(expected, run(build(arch), arch))
    assert_same(run(theirs, arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_peft_merge_and_unload_and_unmerge_restores_the_base(arch: str, tmp_path: Path) -> None:
    theirs = peft_vera(arch)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(build(arch), tmp_path).eval()
    unmerged = run(ours, arch)
    base_weights = {name: value.clone() for name, value in ours.base_model.state_dict().items()}
    ours.merge()
    assert_same(run(ours, arch), unmerged)
    merged_theirs = theirs.merge_and_unload()
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)
    ours.unmerge()
    assert_same(run(ours, arch), unmerged)
    for name, value in ours.base_model.state_dict().items():
        if name in base_weights:
            torch.testing.assert_close(value, base_weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_mixed_batch_with_a_lora_adapter_equals_separate_runs(arch: str) -> None:
    ours = our_vera(arch, name="vera")
    ours.add("lora", deltatune.LoraConfig(r=4, target_modules=list(TARGETS[arch]), init_lora_weights=False))
    ours.activate("vera")
    with_vera = run(ours, arch)
    ours.activate("lora")
    with_lora = run(ours, arch)
    base = run(build(arch), arch)
    mixed = run(ours, arch, adapter_names=["lora", None, "vera"])
    torch.testing.assert_close(mixed[0], with_lora[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[2], with_vera[2], atol=1e-6, rtol=1e-5)
    assert_changed(with_vera, base)


# ----------------------------------------------------------------------------- files hold the pair once
@pytest.mark.parametrize("format", ["deltatune", "peft"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_the_projections_are_saved_once_per_adapter(format: str, save_projection: bool, tmp_path: Path) -> None:
    ours = our_vera("llama", save_projection=save_projection)
    ours.save(tmp_path, format=format)
    keys = file_keys(tmp_path)
    [shared] = projections_of(ours)
    adapters = vera_adapters(ours).values()
    per_layer = sum(adapter.vera_lambda_b.numel() + adapter.vera_lambda_d.numel() for adapter in adapters)
    pair = shared.vera_A.numel() + shared.vera_B.numel() if save_projection else 0
    projection_keys = [key for key in keys if key.endswith(("vera_A", "vera_B"))]
    assert len(projection_keys) == (2 if save_projection else 0)
    assert sum(torch.Size(shape).numel() for shape in keys.values()) == per_layer + pair
    tensor_bytes = 4 * (per_layer + pair)
    assert tensor_bytes <= (tmp_path / "adapter_model.safetensors").stat().st_size < tensor_bytes + 8192
    if format == "peft" and save_projection:
        assert sorted(projection_keys) == ["base_model.vera_A", "base_model.vera_B"]


def test_a_file_without_the_pair_draws_it_again_from_the_key(tmp_path: Path) -> None:
    ours = our_vera("gpt2", save_projection=False, projection_prng_key=5)
    expected = run(ours, "gpt2")
    ours.save(tmp_path)
    assert torch.equal(run(deltatune.load(build("gpt2"), tmp_path), "gpt2"), expected)


# ----------------------------------------------------------------------------- refusals
def test_every_peft_vera_key_is_read_tolerated_or_refused() -> None:
    from deltatune import peft_keys

    classes = [
        set(peft_keys.COMMON_TOLERATED),
        set(peft_keys.VERA_READ),
        set(peft_keys.VERA_TOLERATED),
        set(peft_keys.VERA_REFUSED),
    ]
    unclassified = {field.name for field in dataclasses.fields(peft.VeraConfig)} - set().union(*classes)
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"
    assert sum(map(len, classes)) == len(set().union(*classes)), "a key is in two classes"


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_a_peft_vera_folder_that_trains_biases_is_refused_by_name(bias: str, tmp_path: Path) -> None:
    peft_vera("llama", bias=bias).save_pretrained(tmp_path)
    with pytest.raises(DeltaTuneError, match=f"bias={bias!r}"):
        deltatune.load(build("llama"), tmp_path)


def test_a_layer_vera_does_not_adapt_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModuleError, match="embed_tokens"):
        deltatune.attach(build("llama"), deltatune.VeraConfig(r=4, target_modules=["embed_tokens"]))


def test_a_key_torch_cannot_seed_is_refused() -> None:
    with pytest.raises(DeltaTuneError, match="projection_prng_key"):
        deltatune.VeraConfig(projection_prng_key=2**64)


# ----------------------------------------------------------------------------- training
def test_vera_trains_through_the_command_and_its_loss_falls(tmp_path: Path) -> None:
    adapter = {"method": "vera", "r": 16, "target_modules": "all-linear", "d_initial": 0.1}
    assert main(["train", str(task_config(tmp_path, "causal-lm", method=adapter, learning_rate=0.05)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    data = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert data["method"] == "vera"


@needs_bitsandbytes
def test_a_peft_folder_made_on_a_4bit_base_loads_there_with_peft_outputs(tmp_path: Path) -> None:
    config = peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(build("llama-nf4"), config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(build("llama-nf4"), tmp_path).eval()
    expected = run(theirs.eval(), "llama-nf4")
    assert_changed(expected, run(build("llama-nf4"), "llama-nf4"))
    assert_same(run(ours, "llama-nf4"), expected)


VERA_RESUME = {
    **RESUME_SETTINGS,
    "adapter": {
        "method": "vera",
        "r": 16,
        "target_modules": "all-linear",
        "vera_dropout": 0.2,
        "save_projection": False,
    },
}
"""The resume run with VeRA: dropout on, and the projections not in the checkpoints (drawn again from the key)."""


def test_a_resumed_vera_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **VERA_RESUME), tmp_path)


def test_a_resume_with_another_projection_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = task_config(tmp_path, "causal-lm", **VERA_RESUME)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "adapter.projection_prng_key=3", "adapter.projection_prng_key: 0 → 3"
    )
