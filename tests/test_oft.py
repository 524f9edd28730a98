"""OFT against peft 0.21's: the same rotation from the same parameters, the same outputs (≤ 1e-5) on tiny
Llama and BERT models and a 1×1 convolution, folders read both ways, the same merge; R orthogonal;
mixed batches with LoRA; the refusals; and training through `deltatune train`.

peft has no OFT on GPT-2's Conv1D: there the reference is the plain computation (the layer run on x R,
R built by peft's own rotation module from our parameters)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.oft.layer import OFTRotationModule
from torch import nn

import deltatune
from deltatune import peft_keys
from deltatune.errors import DeltaTuneError, MergeError, UnsupportedModuleError
from deltatune.methods.oft import OftAdapter
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from test_quantized import case, saved  # noqa: F401  (saved: a fixture)
from test_quantized import load as quantized_load
from test_quantized import run as quantized_run
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TARGETS = {"llama": "all-linear", "bert": ["query", "value", "dense"]}
OPTIONS = {
    "neumann": {},
    "exact": {"use_cayley_neumann": False},
    "shared": {"block_share": True},
    "coft": {"coft": True, "eps": 1.0},
    "by-r": {"r": 2, "oft_block_size": 0},
    "neumann-3-terms": {"num_cayley_neumann_terms": 3},
}


def options(name: str, block_size: int = 8) -> dict:
    return {"oft_block_size": block_size, "init_weights": False, **OPTIONS[name]}


def peft_oft(base: nn.Module, targets, **settings) -> peft.PeftModel:
    config = peft.OFTConfig(target_modules=copy.deepcopy(targets), **settings)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def our_oft(base: nn.Module, targets, **settings) -> deltatune.DeltaModel:
    return deltatune.attach(copy.deepcopy(base), deltatune.OFTConfig(target_modules=copy.deepcopy(targets), **settings))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_changed(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert (actual - reference).abs().max().item() > 1e-3


def oft_adapters(model: deltatune.DeltaModel, name: str = "default") -> dict[str, OftAdapter]:
    return {
        module: site.adapters[name]
        for module, site in model.sites()
        if name in site.adapters and isinstance(site.adapters[name], OftAdapter)
    }


def peft_rotation(adapter: OftAdapter, coft: bool = False, eps: float = 6e-5) -> OFTRotationModule:
    """peft's rotation module holding a copy of `adapter`'s parameters."""
    module = OFTRotationModule(
        adapter.oft_R.shape[0],
        adapter.oft_R.shape[1],
        adapter.block_size,
        adapter.features,
        coft=coft,
        eps=eps,
        block_share=adapter.oft_R.shape[0] == 1 and adapter.block_count > 1,
        use_cayley_neumann=adapter.use_neumann,
        num_cayley_neumann_terms=adapter.terms,
    )
    with torch.no_grad():
        module.weight.copy_(adapter.oft_R)
    return module


class ConvNet(nn.Module):
    """A 1×1 convolution (OFT's convolution) and a 3×3 one, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(8, 12, 1, stride=2)
        self.spatial = nn.Conv2d(12, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.spatial(torch.relu(self.pointwise(x))).mean((2, 3)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_input() -> torch.Tensor:
    return torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the rotation
@pytest.mark.parametrize("option", list(OPTIONS))
def test_rotation_equals_peft_block_diagonal_for_the_same_parameters(option: str) -> None:
    settings = options(option)
    delta_model = our_oft(build("llama"), "all-linear", **settings)
    for adapter in oft_adapters(delta_model).values():
        reference = peft_rotation(adapter, coft=settings.get("coft", False), eps=settings.get("eps", 6e-5))
        torch.testing.assert_close(adapter.rotation_matrix(), reference.get_weight().detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [{"use_cayley_neumann": False}, {"use_cayley_neumann": False, "block_share": True}],
    ids=["exact", "exact-shared"],
)
def test_rotation_is_orthogonal_for_random_parameters(settings: dict) -> None:
    delta_model = our_oft(build("llama"), "all-linear", oft_block_size=16, init_weights=False, **settings)
    for adapter in oft_adapters(delta_model).values():
        with torch.no_grad():
            adapter.oft_R.normal_(0, 1.0)
        rotation = adapter.rotation_matrix()
        identity = torch.eye(rotation.shape[0])
        torch.testing.assert_close(rotation.t() @ rotation, identity, atol=1e-5, rtol=0)
        assert (rotation - identity).abs().max() > 0.1


def test_the_neumann_series_is_orthogonal_to_its_truncation() -> None:
    """Cayley-Neumann is orthogonal only up to its dropped terms: for small Q (‖Q‖ ~ 0.05) within 1e-5."""
    delta_model = our_oft(build("llama"), "all-linear", oft_block_size=8, num_cayley_neumann_terms=8)
    for adapter in oft_adapters(delta_model).values():
        with torch.no_grad():
            adapter.oft_R.normal_(0, 0.01)
        rotation = adapter.rotation_matrix()
        torch.testing.assert_close(rotation.t() @ rotation, torch.eye(rotation.shape[0]), atol=1e-5, rtol=0)


def test_eval_mode_keeps_the_rotation_until_its_parameters_change() -> None:
    delta_model = our_oft(build("llama"), ["q_proj"], **options("neumann")).eval()
    adapter = next(iter(oft_adapters(delta_model).values()))
    with torch.no_grad():
        first = adapter.blocks()
        delta_model.eval()
        assert adapter.blocks() is first
        adapter.oft_R.mul_(2.0)
        changed = adapter.blocks()
    assert changed is not first
    torch.testing.assert_close(changed, adapter.computed_blocks().detach(), atol=0, rtol=0)
    reference = peft_rotation(adapter).get_weight().detach()
    torch.testing.assert_close(adapter.rotation_matrix(), reference, atol=1e-6, rtol=0)
    with torch.inference_mode():
        assert adapter.blocks() is not first and adapter.blocks().is_inference()
    with torch.no_grad():
        assert not adapter.blocks().is_inference()
    delta_model.train()
    assert adapter.blocks() is not adapter.blocks()
    assert adapter.blocks().requires_grad


def test_output_equals_base_at_init_with_peft_defaults() -> None:
    base = build("llama")
    delta_model = deltatune.attach(copy.deepcopy(base), deltatune.OFTConfig())
    assert delta_model.targets["default"] == peft_oft(base, None).targeted_module_names
    assert torch.equal(run(delta_model, "llama"), run(base.requires_grad_(False), "llama"))


# ----------------------------------------------------------------------------- against peft
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_peft_folder_loads_with_peft_outputs(arch: str, option: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_oft(base, TARGETS[arch], **options(option))
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(ours, arch), expected)
    assert sorted(ours.targets["default"]) == sorted(theirs.targeted_module_names)


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("option", ["neumann", "exact", "shared", "by-r"])
def test_our_peft_format_loads_in_peft_with_our_outputs(arch: str, option: str, tmp_path: Path) -> None:
    base = build(arch)
    ours = our_oft(base, TARGETS[arch], **options(option)).eval()
    expected = run(ours, arch)
    assert_changed(expected, run(base, arch))
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(theirs, arch), expected)
    assert sorted(theirs.targeted_module_names) == sorted(ours.targets["default"])


def test_a_block_size_that_does_not_divide_is_adjusted_as_peft_adjusts_it(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft_oft(base, "all-linear", oft_block_size=12, init_weights=False)
    theirs.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="does not divide"):
        ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    sizes = {name: adapter.block_size for name, adapter in oft_adapters(ours).items()}
    assert sizes == {name: theirs.base_model.model.get_submodule(name).oft_block_size["default"] for name in sizes}
    assert_same(run(ours, "llama"), run(theirs, "llama"))


def test_two_active_adapters_rotate_in_order_as_in_peft(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft_oft(base, "all-linear", **options("neumann"))
    theirs.add_adapter("second", peft.OFTConfig(target_modules="all-linear", oft_block_size=16, init_weights=False))
    theirs.base_model.set_adapter(["default", "second"])
    expected = run(theirs, "llama")
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "second"), name="second")
    deltatune.load(ours, str(tmp_path), name="default")
    ours.activate("default", "second")
    assert_same(run(ours.eval(), "llama"), expected)
    ours.merge(["second", "default"])  # x R_a R_b through W is W (R_a R_b)ᵀ = (W R_bᵀ) R_aᵀ
    assert_same(run(ours, "llama"), expected)


def test_the_embedding_rotates_its_output_as_in_peft(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft_oft(base, ["embed_tokens", "q_proj"], **options("neumann"))
    expected = run(theirs, "llama")
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(ours, "llama"), expected)
    ours.save(str(tmp_path / "ours"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_same(run(again, "llama"), expected)


def test_a_pointwise_convolution_matches_peft_both_ways(tmp_path: Path) -> None:
    base, x = conv_net(), conv_input()
    theirs = peft_oft(base, ["pointwise"], oft_block_size=4, init_weights=False)
    expected = theirs(x)
    assert_changed(expected, base(x))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    assert_same(ours(x), expected)
    ours.save(str(tmp_path / "ours"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_same(again(x), expected)


def test_a_larger_convolution_kernel_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModuleError, match="spatial has kernel"):
        deltatune.attach(conv_net(), deltatune.OFTConfig(target_modules=["spatial"], oft_block_size=4))


# ----------------------------------------------------------------------------- merging
MERGE_CASES = {
    "llama": (lambda: build("llama"), "all-linear", lambda model: run(model, "llama")),
    "bert": (lambda: build("bert"), TARGETS["bert"], lambda model: run(model, "bert")),
    "conv": (conv_net, ["pointwise"], lambda model: model(conv_input())),
    "embedding": (lambda: build("llama"), ["embed_tokens", "o_proj"], lambda model: run(model, "llama")),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_equals_peft_merge_and_unload(case: str, tmp_path: Path) -> None:
    make, targets, forward = MERGE_CASES[case]
    base = make()
    theirs = peft_oft(base, targets, **options("neumann", block_size=4))
    theirs.save_pretrained(str(tmp_path))
    merged_theirs = theirs.merge_and_unload()
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    unmerged = forward(ours)
    merged_ours = ours.unload(merge=True)
    for (name, mine), (_, reference) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0, msg=lambda message: f"{name}: {message}")
    assert_same(forward(merged_ours), unmerged)


def base_weights(model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.base_model.state_dict().items() if "deltatune" not in name}


@pytest.mark.parametrize("option", ["neumann", "exact", "coft"])
def test_merge_matches_unmerged_and_unmerge_subtracts_what_merge_added(option: str) -> None:
    base = build("llama")
    ours = our_oft(base, "all-linear", **options(option)).eval()
    before = base_weights(ours)
    expected = run(ours, "llama")
    ours.merge()
    assert_same(run(ours, "llama"), expected)
    with torch.no_grad():  # the rotation changes after the merge: unmerge still takes out what merge put in
        for adapter in oft_adapters(ours).values():
            adapter.oft_R.mul_(3.0)
    ours.unmerge()
    for name, tensor in base_weights(ours).items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=0)


def test_mixed_batch_with_lora_equals_separate_runs() -> None:
    base = build("llama")
    ours = our_oft(base, "all-linear", **options("neumann")).eval()
    ours.add("lora", deltatune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ours.add(
        "second",
        deltatune.OFTConfig(
            target_modules=["q_proj", "down_proj", "embed_tokens"], oft_block_size=16, init_weights=False
        ),
    )
    separate = {}
    for name in ("default", "lora", "second"):
        ours.activate(name)
        separate[name] = run(ours, "llama")
    with ours.disabled():
        plain = run(ours, "llama")
    mixed = run(ours, "llama", adapter_names=["lora", "default", "second"])
    for row, name in enumerate(["lora", "default", "second"]):
        torch.testing.assert_close(mixed[row], separate[name][row], atol=1e-6, rtol=1e-5)
    mixed = run(ours, "llama", adapter_names=[None, "default", None])
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed[1], separate["default"][1], atol=1e-6, rtol=1e-5)


def test_the_plain_computation_on_gpt2_conv1d() -> None:
    """GPT-2's Conv1D (weight in × out): the layer on x R, R from peft's rotation module; merged W' = R W."""
    base = build("gpt2")
    ours = our_oft(base, ["c_attn", "c_fc"], **options("neumann")).eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    for module_name, adapter in oft_adapters(ours).items():
        rotation = peft_rotation(adapter).get_weight().detach()
        module = ours.base_model.get_submodule(module_name)
        original = copy.deepcopy(base.get_submodule(module_name))
        assert_same(module(x), original(x @ rotation))
        assert_same(adapter.delta_parameters(module)["weight"], rotation @ original.weight - original.weight)


def test_a_conv1d_adapter_refuses_peft_format_by_name(tmp_path: Path) -> None:
    ours = our_oft(build("gpt2"), "all-linear", oft_block_size=8)
    with pytest.raises(DeltaTuneError, match="no OFT on GPT-2's Conv1D"):
        ours.save(str(tmp_path), format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


# ----------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("arch,kind", [case("llama", kind) for kind in ("nf4", "int8", "quanto-int8", "torchao-int8")])
def test_a_quantized_base_matches_peft_and_merges_only_dequantized(arch: str, kind: str, saved, tmp_path: Path) -> None:  # noqa: F811
    """peft's OFT on the same quantized layers, read here; the packed weights are never merged into. The models
    stay in training mode (no dropout in them), where bitsandbytes computes from its dequantized weight in
    float32, as the dequantized merge does (tests/test_quantized.py)."""
    theirs = peft.get_peft_model(
        quantized_load(saved, arch, kind),
        peft.OFTConfig(target_modules="all-linear", oft_block_size=8, init_weights=False),
    )
    expected = quantized_run(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(quantized_load(saved, arch, kind), str(tmp_path)).train()
    assert_same(quantized_run(ours), expected)
    with pytest.raises(MergeError, match="dequantize=True"):
        ours.merge()
    assert_same(quantized_run(ours), expected)
    assert_same(quantized_run(ours.unload(merge=True, dequantize=True)), expected)


# ----------------------------------------------------------------------------- config and folders
def test_every_peft_oft_key_is_read_tolerated_or_refused() -> None:
    classes = [
        set(peft_keys.COMMON_TOLERATED),
        set(peft_keys.OFT_READ),
        set(peft_keys.OFT_TOLERATED),
        set(peft_keys.OFT_REFUSED),
    ]
    unclassified = {field.name for field in dataclasses.fields(peft.OFTConfig)} - set().union(*classes)
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"
    assert sum(map(len, classes)) == len(set().union(*classes)), "a key is in two classes"


def test_our_config_has_peft_fields_and_defaults() -> None:
    ours = {field.name: field.default for field in dataclasses.fields(deltatune.OFTConfig)}
    theirs = {field.name: field.default for field in dataclasses.fields(peft.OFTConfig)}
    for key in peft_keys.OFT_READ:
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"r": 4, "oft_block_size": 8}, "exactly one of r and oft_block_size"),
        ({"r": 0, "oft_block_size": 0}, "exactly one of r and oft_block_size"),
        ({"module_dropout": 0.1}, "module_dropout=0.1 is not implemented"),
        ({"oft_block_size": -1}, "oft_block_size must be"),
    ],
)
def test_a_setting_we_do_not_compute_is_refused_by_name(settings: dict, message: str) -> None:
    with pytest.raises(DeltaTuneError, match=message):
        deltatune.OFTConfig(**settings)


def peft_folder(folder: Path, **keys) -> tuple[nn.Module, torch.Tensor]:
    """peft's OFT adapter on the tiny Llama in `folder`, with `keys` written into its config; the base and
    peft's output."""
    base = build("llama")
    theirs = peft_oft(base, ["q_proj", "v_proj"], **options("neumann"))
    theirs.save_pretrained(str(folder))
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **keys}))
    return base, run(theirs, "llama")


def test_a_peft_folder_that_trains_biases_is_refused_by_name(tmp_path: Path) -> None:
    base, _ = peft_folder(tmp_path, bias="all")
    with pytest.raises(DeltaTuneError, match="bias='all'"):
        deltatune.load(copy.deepcopy(base), str(tmp_path))


def test_a_folder_of_peft_before_0_14_is_refused_by_name(tmp_path: Path) -> None:
    base, _ = peft_folder(tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    del data["oft_block_size"]
    config.write_text(json.dumps(data))
    with pytest.raises(DeltaTuneError, match="before 0.14"):
        deltatune.load(copy.deepcopy(base), str(tmp_path))


@pytest.mark.parametrize("version", [None, "0.17.1"])
def test_a_neumann_folder_of_peft_before_0_18_warns(version: str | None, tmp_path: Path) -> None:
    base, expected = peft_folder(tmp_path, peft_version=version)
    with pytest.warns(UserWarning, match="before 0.18"):
        ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(ours, "llama"), expected)


def test_module_dropout_in_a_peft_folder_loads_with_peft_outputs(tmp_path: Path) -> None:
    """peft 0.21 never applies module_dropout, so the folder's outputs are the rotation's alone."""
    base, expected = peft_folder(tmp_path, module_dropout=0.2)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(ours, "llama"), expected)


# ----------------------------------------------------------------------------- training
def test_deltatune_train_with_oft_makes_the_loss_fall(tmp_path: Path) -> None:
    adapter = {"method": "oft", "oft_block_size": 8, "target_modules": "all-linear"}
    result = train(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=adapter)), progress=False)
    assert result.run.delta_model.configs["default"].method == "oft"
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0], trained
