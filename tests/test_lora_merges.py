"""TIES, DARE and magnitude-pruned merges in `add_weighted_adapter`, against peft 0.21's with the same
weights and random seed: the combined adapter's factors (non-SVD forms) or its ΔW (SVD forms) and the
outputs with it active agree within 1e-5, and the global generator is left where peft leaves it."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
NAMES = ("a", "b", "c")
ALPHAS = (8, 3, 5)
WEIGHTS = [0.7, -0.4, 1.1]
FACTOR_TYPES = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
SIGNED = {"ties", "dare_ties", "ties_svd", "dare_ties_svd"}
CASES = [
    (kind, density, sign)
    for kind in FACTOR_TYPES + SVD_TYPES
    for density in (0.5, 1.0)
    for sign in (["total", "frequency"] if kind in SIGNED else ["total"])
]


# Layers whose weight peft stores (in, out): GPT-2's Conv1D, and the embedding.
LAYOUTS = {"gpt2": "all-linear", "llama": ["embed_tokens", "q_proj"]}


def three_adapters(tmp_path: Path, ranks: tuple[int, ...] = (4, 4, 4), arch: str = "llama", targets="all-linear"):
    """The tiny model, peft's model with random non-zero adapters a, b, c on `targets`, and deltatune's
    model with the same adapters loaded from peft's folders."""
    base = build(arch)
    configs = [
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=copy.deepcopy(targets), init_lora_weights=False)
        for rank, alpha in zip(ranks, ALPHAS)
    ]
    theirs = peft.get_peft_model(copy.deepcopy(base), configs[0], adapter_name=NAMES[0])
    for name, config in zip(NAMES[1:], configs[1:]):
        theirs.add_adapter(name, config)
    theirs.eval().save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / NAMES[0]), name=NAMES[0])
    for name in NAMES[1:]:
        deltatune.load(ours, str(tmp_path / name), name=name)
    return base, theirs, ours.eval()


def peft_factors(model: peft.PeftModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scaling)} of peft's adapter `name`."""
    found = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
            found[module_name] = (module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
        elif isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_embedding_A:
            found[module_name] = (module.lora_embedding_A[name], module.lora_embedding_B[name], module.scaling[name])
    return found


def our_factors(model: deltatune.DeltaModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {
        module_name: (site.adapters[name].lora_A, site.adapters[name].lora_B, site.adapters[name].scaling)
        for module_name, site in model.sites()
        if name in site.adapters
    }


def merged_pair(tmp_path: Path, seed: int, arch: str = "llama", targets="all-linear", names=NAMES, **options):
    """peft's and deltatune's combination "m" of `names` under the same seed; the outputs with it
    active, its factors, and one draw of the generator after each call."""
    base, theirs, ours = three_adapters(tmp_path, arch=arch, targets=targets)
    weights = WEIGHTS[: len(names)]
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(list(names), weights, "m", **options)
    after_theirs = torch.rand(4)
    torch.manual_seed(seed)
    ours.add_weighted_adapter(list(names), weights, "m", **options)
    after_ours = torch.rand(4)
    theirs.set_adapter("m")
    return {
        "base": run(base, arch),
        "theirs": run(theirs, arch),
        "ours": run(ours.activate("m"), arch),
        "factors": (peft_factors(theirs, "m"), our_factors(ours, "m")),
        "draws": (after_theirs, after_ours),
    }


def assert_equal_merges(result: dict, combination_type: str) -> None:
    """Factors (ΔW for the SVD forms, whose singular vectors' signs are free), outputs and the
    generator's next draws equal peft's; the merged adapter really changes the output."""
    theirs, ours = result["factors"]
    assert theirs.keys() == ours.keys() and theirs
    for module_name, (their_A, their_B, their_scaling) in theirs.items():
        our_A, our_B, our_scaling = ours[module_name]
        assert our_scaling == their_scaling == 1.0
        if combination_type.endswith("svd"):
            torch.testing.assert_close(our_B @ our_A, their_B @ their_A, atol=ATOL, rtol=0, msg=module_name)
        else:
            torch.testing.assert_close(our_A, their_A, atol=ATOL, rtol=0, msg=module_name)
            torch.testing.assert_close(our_B, their_B, atol=ATOL, rtol=0, msg=module_name)
    torch.testing.assert_close(result["ours"], result["theirs"], atol=ATOL, rtol=0)
    assert (result["ours"] - result["base"]).abs().max() > 1e-3
    torch.testing.assert_close(*result["draws"], atol=0, rtol=0)


@pytest.mark.parametrize(("combination_type", "density", "sign"), CASES)
def test_merge_equals_peft_for_the_same_seed(combination_type: str, density: float, sign: str, tmp_path: Path) -> None:
    options = {"density": density, "majority_sign_method": sign}
    assert_equal_merges(merged_pair(tmp_path, 1234, combination_type=combination_type, **options), combination_type)


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_plain_merges_equal_peft_with_three_adapters(combination_type: str, tmp_path: Path) -> None:
    assert_equal_merges(merged_pair(tmp_path, 0, combination_type=combination_type), combination_type)


@pytest.mark.parametrize("combination_type", ["dare_linear_svd", "dare_ties", "ties_svd"])
@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_merge_equals_peft_on_layers_stored_in_by_out(arch: str, combination_type: str, tmp_path: Path) -> None:
    """DARE's masks on ΔW fall where peft's do also where peft holds ΔW as (in, out)."""
    result = merged_pair(tmp_path, 9, arch=arch, targets=LAYOUTS[arch], combination_type=combination_type, density=0.5)
    assert_equal_merges(result, combination_type)


@pytest.mark.parametrize("combination_type", ["dare_ties", "svd"])
def test_one_adapter_is_merged_linearly_as_in_peft(combination_type: str, tmp_path: Path) -> None:
    result = merged_pair(tmp_path, 3, names=NAMES[:1], combination_type=combination_type, density=0.3, svd_rank=2)
    assert_equal_merges(result, "linear")


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties_svd"])
def test_dare_masks_depend_on_the_seed_as_in_peft(combination_type: str, tmp_path: Path) -> None:
    """Another seed gives other masks (so the seed really reaches them), still equal to peft's."""
    first = merged_pair(tmp_path / "1", 1, combination_type=combination_type, density=0.5)
    second = merged_pair(tmp_path / "2", 2, combination_type=combination_type, density=0.5)
    torch.testing.assert_close(second["ours"], second["theirs"], atol=ATOL, rtol=0)
    assert (first["ours"] - second["ours"]).abs().max() > 1e-3


def test_svd_clamp_and_reduced_matrices_equal_peft(tmp_path: Path) -> None:
    options = {"combination_type": "ties_svd", "density": 0.6, "svd_rank": 3, "svd_clamp": 0.9}
    result = merged_pair(tmp_path, 5, svd_full_matrices=False, **options)
    torch.testing.assert_close(result["ours"], result["theirs"], atol=ATOL, rtol=0)
    for module_name, (their_A, their_B, _) in result["factors"][0].items():
        our_A, our_B, _ = result["factors"][1][module_name]
        assert our_A.shape[0] == 3
        torch.testing.assert_close(our_B @ our_A, their_B @ their_A, atol=ATOL, rtol=0, msg=module_name)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"combination_type": "ties", "density": 0.0}, "density"),
        ({"combination_type": "dare_linear", "density": 1.5}, "density"),
        ({"combination_type": "magnitude_prune_svd"}, "density"),
        ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"}, "majority_sign_method"),
        ({"combination_type": "task_arithmetic"}, "combination_type"),
        ({"combination_type": "ties_svd", "density": 0.5, "svd_clamp": 2.0}, "svd_clamp"),
        ({"combination_type": "svd", "svd_driver": "gesdd"}, "svd_driver"),
    ],
)
def test_bad_merge_options_are_refused_in_one_line(options: dict, message: str, tmp_path: Path) -> None:
    _, _, ours = three_adapters(tmp_path)
    with pytest.raises(DeltaTuneError, match=message) as refusal:
        ours.add_weighted_adapter(list(NAMES), WEIGHTS, "m", **options)
    assert "\n" not in str(refusal.value)
    assert "m" not in ours.configs


def test_svd_driver_is_refused_off_cuda(tmp_path: Path) -> None:
    """torch takes a driver on CUDA only; elsewhere the choice is refused before any draw."""
    _, _, ours = three_adapters(tmp_path)
    state = torch.random.get_rng_state()
    with pytest.raises(DeltaTuneError, match="svd_driver"):
        ours.add_weighted_adapter(
            list(NAMES), WEIGHTS, "m", combination_type="dare_ties_svd", density=0.5, svd_driver="gesvd"
        )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "m" not in ours.configs


def test_equal_rank_types_refuse_unequal_ranks(tmp_path: Path) -> None:
    _, _, ours = three_adapters(tmp_path, ranks=(4, 2, 4))
    with pytest.raises(DeltaTuneError, match="equal rank"):
        ours.add_weighted_adapter(list(NAMES), WEIGHTS, "m", combination_type="dare_ties", density=0.5)
    ours.add_weighted_adapter(list(NAMES), WEIGHTS, "m", combination_type="dare_ties_svd", density=0.5)
    assert "m" in ours.configs


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"kasa_config": {}}], ids=["dora", "kasa"])
def test_dora_and_kasa_adapters_are_refused_before_anything_changes(variant: dict) -> None:
    model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, **variant), name="a")
    model.add("b", deltatune.LoraConfig(r=4))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(DeltaTuneError, match=r"cannot combine DoRA or KaSA adapters \(a\)") as error:
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="linear")
    assert "\n" not in str(error.value) and "mix" not in model.configs
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def unchanged_after_refusal(model: deltatune.DeltaModel, adapters: list[str], weights: list[float]) -> str:
    """The one-line message of the refused `add_weighted_adapter`; no adapter "mix" is left and no tensor changed."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(DeltaTuneError) as refusal:
        model.add_weighted_adapter(adapters, weights, "mix", combination_type="cat")
    assert "\n" not in str(refusal.value) and "mix" not in model.configs
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    return str(refusal.value)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus-inf"])
def test_non_finite_weights_are_refused_in_one_line(weight: float) -> None:
    model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, init_lora_weights=False), name="a")
    model.add("b", deltatune.LoraConfig(r=4, init_lora_weights=False))
    message = unchanged_after_refusal(model, ["a", "b"], [1.0, weight])
    assert f"weights must be finite numbers, got [1.0, {weight}]" in message


UNCOMBINABLE_PARTS = {
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, r"cannot combine a: a copy of lm_head \(modules_to_save\)"),
    "use_gating": ({"use_gating": True}, r"cannot combine a: a gated LoRA's gate \(use_gating\) depends on its input"),
}


@pytest.mark.parametrize("adapters", [["a"], ["a", "b"]], ids=["alone", "with-a-plain-lora"])
@pytest.mark.parametrize("part", list(UNCOMBINABLE_PARTS))
def test_adapters_with_parts_beyond_the_factors_are_refused_before_anything_changes(
    part: str, adapters: list[str]
) -> None:
    """A module copy would be left out of the combination, and a gate taken as a scale of 1: even one such
    adapter at weight 1 would not give its own outputs back."""
    options, message = UNCOMBINABLE_PARTS[part]
    model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, init_lora_weights=False, **options), name="a")
    model.add("b", deltatune.LoraConfig(r=4, init_lora_weights=False))
    assert re.search(message, unchanged_after_refusal(model, adapters, [1.0] * len(adapters)))


def test_two_adapters_with_copies_of_one_module_are_refused_as_peft_refuses_them() -> None:
    config = {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "init_lora_weights": False}
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**config), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**config))
    with pytest.raises(ValueError, match="target the same module with modules_to_save"):
        theirs.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")
    ours = deltatune.attach(build("llama"), deltatune.LoraConfig(**config), name="a")
    ours.add("b", deltatune.LoraConfig(**config))
    message = unchanged_after_refusal(ours, ["a", "b"], [0.5, 0.5])
    assert "cannot combine a, b: a copy of lm_head (modules_to_save)" in message
