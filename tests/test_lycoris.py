"""deltatune's LoHa and LoKr against peft 0.21's: with the same weights, the same outputs (atol 1e-5).

Each test runs over both methods and over option sets that reach every shape peft can give: LoHa's
factored (rank-r²) and materialised products, LoKr's decomposed and full W1 / W2, `decompose_factor`,
and on convolutions the flattened and the core-tensor (`use_effective_conv2d`) forms. Adapters start
random (`init_weights=False`), move to the other side through a folder, and the two models' outputs are
compared on the same inputs. peft does not adapt GPT-2's Conv1D layers: its reference for GPT-2 is the
same model with each Conv1D made an `nn.Linear` of the transposed weight (the same function).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5
CONFIGS = {"loha": (peft.LoHaConfig, deltatune.LoHaConfig), "lokr": (peft.LoKrConfig, deltatune.LoKrConfig)}

# At hidden 32, LoHa with r = 2 takes the factored product on every linear layer, r = 6 makes ΔW.
LINEAR_OPTIONS = [
    ("loha", {"r": 2}),
    ("loha", {"r": 6, "alpha": 5}),
    ("lokr", {"r": 2}),
    ("lokr", {"r": 1, "decompose_both": True}),
    ("lokr", {"r": 3, "decompose_factor": 4}),
    ("lokr", {"r": 8}),
]
CONV_OPTIONS = [
    ("loha", {"r": 2}),
    ("loha", {"r": 2, "use_effective_conv2d": True}),
    ("lokr", {"r": 1}),
    ("lokr", {"r": 1, "use_effective_conv2d": True}),
    ("lokr", {"r": 2}),  # full W2 everywhere, the 3-d one of the Conv1d too
    ("lokr", {"r": 1, "decompose_both": True, "use_effective_conv2d": True}),
]
ARCHS = ["llama", "gpt2", "bert"]


def options_id(value: object) -> str:
    if isinstance(value, dict):
        return ",".join(f"{key}={option}" for key, option in value.items())
    return str(value)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_changed(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """The adapter must really change the output, or an equality check proves nothing."""
    assert (actual - reference).abs().max().item() > 1e-3


def peft_config(method: str, targets, **options) -> peft.PeftConfig:
    options = {"alpha": 3, "init_weights": False, **copy.deepcopy(options)}
    return CONFIGS[method][0](target_modules=copy.deepcopy(targets), **options)


def our_config(method: str, targets, **options) -> deltatune.DeltaConfig:
    options = {"alpha": 3, "init_weights": False, **copy.deepcopy(options)}
    return CONFIGS[method][1](target_modules=copy.deepcopy(targets), **options)


def with_linear_layers(model: nn.Module) -> nn.Module:
    """A copy of `model` with every transformers Conv1D replaced by the `nn.Linear` it computes."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def peft_model(base: nn.Module, config: peft.PeftConfig) -> peft.PeftModel:
    """peft's model on a copy of `base` (GPT-2 with Linear layers in place of its Conv1D ones)."""
    return peft.get_peft_model(with_linear_layers(base), config).eval()


# ----------------------------------------------------------------------------- transformers models
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,options", LINEAR_OPTIONS, ids=options_id)
def test_peft_folder_loads_with_peft_outputs(method: str, options: dict, arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_model(base, peft_config(method, "all-linear", **options))
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    theirs.save_pretrained(str(tmp_path))

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert sorted(ours.targets["default"]) == sorted(theirs.targeted_module_names)
    assert_same(run(ours, arch), expected)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method,options", LINEAR_OPTIONS, ids=options_id)
def test_our_peft_format_loads_in_peft_with_our_outputs(method: str, options: dict, arch: str, tmp_path: Path) -> None:
    base = build(arch)
    ours = deltatune.attach(copy.deepcopy(base), our_config(method, "all-linear", **options)).eval()
    expected = run(ours, arch)
    assert_changed(expected, run(base, arch))
    ours.save(str(tmp_path), format="peft")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert sorted(theirs.targeted_module_names) == sorted(ours.targets["default"])
    assert_same(run(theirs, arch), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_gpt2_conv1d_adapters_match_peft_on_the_linear_form_and_refuse_peft_files(method: str, tmp_path: Path) -> None:
    """Ours on GPT-2's Conv1D layers equal peft's on the same layers as Linear ones; peft could not load
    them, so saving them in peft's format is refused and writes nothing."""
    base = build("gpt2")
    ours = deltatune.attach(copy.deepcopy(base), our_config(method, ["c_attn", "c_fc"], r=2)).eval()
    expected = run(ours, "gpt2")
    ours.save(str(tmp_path / "ours"))
    theirs = peft_model(base, peft_config(method, ["c_attn", "c_fc"], r=2))
    for name, site in ours.sites():
        adapter = site.adapters["default"]
        layer = theirs.base_model.model.get_submodule(name)
        for tensor_name, tensor in adapter.file_state().items():
            getattr(layer, tensor_name)["default"].data.copy_(tensor)
    assert_same(run(theirs, "gpt2"), expected)
    with pytest.raises(deltatune.DeltaTuneError, match="Conv1D.*format='deltatune'"):
        ours.save(str(tmp_path / "peft"), format="peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method,options", LINEAR_OPTIONS, ids=options_id)
def test_merge_matches_peft_merge_and_unload_and_unmerge_restores(
    method: str, options: dict, arch: str, tmp_path: Path
) -> None:
    base = build(arch)
    theirs = peft_model(base, peft_config(method, "all-linear", **options))
    unmerged = run(theirs, arch)
    theirs.save_pretrained(str(tmp_path))
    merged_theirs = theirs.merge_and_unload()

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    ours.merge()
    assert_same(run(ours, arch), unmerged)
    for name, parameter in merged_theirs.named_parameters():
        torch.testing.assert_close(ours.base_model.get_parameter(name), parameter, atol=ATOL, rtol=0, msg=name)
    ours.unmerge()
    assert_same(run(ours, arch), unmerged)
    for name, parameter in base.named_parameters():
        torch.testing.assert_close(ours.base_model.get_parameter(name), parameter, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("method,options", LINEAR_OPTIONS[:4], ids=options_id)
def test_mixed_batch_with_a_lora_adapter_matches_peft_run_separately(
    method: str, options: dict, tmp_path: Path
) -> None:
    base = build("llama")
    theirs = peft_model(base, peft_config(method, "all-linear", **options))
    theirs.save_pretrained(str(tmp_path / "a"))
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    ).eval()
    lora.save_pretrained(str(tmp_path / "b"))

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "a"), name="a")
    ours = deltatune.load(ours, str(tmp_path / "b"), name="b").eval()
    mixed = run(ours, "llama", adapter_names=["a", "b", None])
    assert_same(mixed[0], run(theirs, "llama")[0])
    assert_same(mixed[1], run(lora, "llama")[1])
    assert_same(mixed[2], run(base, "llama")[2])
    assert_changed(mixed[0], mixed[2])


@pytest.mark.parametrize("method", CONFIGS)
def test_rank_and_alpha_patterns_round_trip_through_peft(method: str, tmp_path: Path) -> None:
    base = build("llama")
    patterns = {"rank_pattern": {"q_proj": 3, "layers.1.mlp.down_proj": 1}, "alpha_pattern": {"v_proj": 5}}
    theirs = peft_model(base, peft_config(method, "all-linear", r=2, **patterns))
    expected = run(theirs, "llama")
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    adapters = {name: site.adapters["default"] for name, site in ours.sites()}
    probes = {
        "model.layers.0.self_attn.q_proj": (3, 3),
        "model.layers.1.mlp.down_proj": (1, 3),
        "model.layers.0.mlp.down_proj": (2, 3),
        "model.layers.1.self_attn.v_proj": (2, 5),
    }
    assert {name: (adapters[name].rank, adapters[name].alpha) for name in probes} == probes
    for name, adapter in adapters.items():
        layer = theirs.base_model.model.get_submodule(name)
        assert (adapter.rank, adapter.alpha, adapter.scaling) == (
            layer.r["default"],
            layer.alpha["default"],
            layer.scaling["default"],
        )
    assert_same(run(ours, "llama"), expected)

    ours.save(str(tmp_path / "back"), format="peft")
    saved = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert saved["rank_pattern"]["model\\.layers\\.1\\.mlp\\.down_proj"] == 1
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert_same(run(again, "llama"), expected)


# ----------------------------------------------------------------------------- convolutions
class ConvNet(nn.Module):
    """Conv2d 3x3 -> ReLU -> Conv2d 1x1 -> flatten the image -> strided Conv1d; a strided Conv2d; and a
    Linear head with a prime output size (LoKr's factored product does not pay there: ΔW is made)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1, stride=2)
        self.down = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Linear(124, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.conv2(self.act(self.conv1(x)))
        features = torch.cat([self.seq(image.flatten(2)).flatten(1), self.down(x).flatten(1)], dim=1)
        return self.head(features)


CONV_TARGETS = ["conv1", "conv2", "seq", "down", "head"]


def conv_base() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_inputs() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def peft_runs(method: str, options: dict) -> list[str]:
    """The conv targets peft 0.21 can run: not LoKr's core form on the Conv1d (see the test below)."""
    core_lokr = method == "lokr" and options.get("use_effective_conv2d")
    return [target for target in CONV_TARGETS if not (core_lokr and target == "seq")]


def test_lokr_core_form_on_a_conv1d_equals_torch_kron_where_peft_fails() -> None:
    """peft 0.21 raises in torch.kron on this layer (its einsum output's unit kernel dim has stride ≠ 1);
    ours equals the Conv1d run with W + s · kron(W1 ⊗ W2) formed by torch.kron on contiguous factors."""
    base, x = conv_base(), conv_inputs()
    image = base.conv2(base.act(base.conv1(x))).flatten(2).detach()
    theirs = peft_model(base, peft_config("lokr", ["seq"], r=1, use_effective_conv2d=True))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        theirs(x)
    ours = deltatune.attach(copy.deepcopy(base), our_config("lokr", ["seq"], r=1, use_effective_conv2d=True))
    adapter = dict(ours.sites())["seq"].adapters["default"]
    w2 = torch.einsum("abkl,ao,bc->ockl", adapter.lokr_t2, adapter.lokr_w2_a, adapter.lokr_w2_b)
    kron = torch.kron(adapter.lokr_w1[:, :, None, None], w2.clone(memory_format=torch.contiguous_format))
    weight = base.seq.weight + adapter.scaling * kron.reshape(base.seq.weight.shape)
    expected = torch.nn.functional.conv1d(image, weight, base.seq.bias, stride=2, padding=1)
    assert_changed(expected, base.seq(image))
    assert_same(ours.base_model.seq(image), expected)


@pytest.mark.parametrize("method,options", CONV_OPTIONS, ids=options_id)
def test_conv_adapters_match_peft_both_ways_and_merge_as_peft_merges(
    method: str, options: dict, tmp_path: Path
) -> None:
    base, x = conv_base(), conv_inputs()
    targets = peft_runs(method, options)
    theirs = peft_model(base, peft_config(method, targets, **options))
    expected = theirs(x)
    assert_changed(expected, base(x))
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert_same(ours(x), expected)
    ours.save(str(tmp_path / "back"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert_same(again(x), expected)

    merged_theirs = theirs.merge_and_unload()
    ours.merge()
    assert_same(ours(x), expected)
    for name, parameter in merged_theirs.named_parameters():
        torch.testing.assert_close(ours.base_model.get_parameter(name), parameter, atol=ATOL, rtol=0, msg=name)
    ours.unmerge()
    assert_same(ours(x), expected)


# ----------------------------------------------------------------------------- quantized base
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("method", CONFIGS)
def test_on_a_4bit_base_outputs_match_peft_on_the_dequantized_base_and_the_packed_weights_stay(
    method: str, tmp_path: Path
) -> None:
    """Shapes come from the logical in/out features; peft, given the same factors on the base with each
    nf4 layer dequantized to a float Linear, computes the same outputs. Training leaves the packed
    storage bit-identical."""
    from deltatune.quantized import dequantized_linear, is_quantized

    ours = deltatune.attach(build("llama-nf4"), our_config(method, "all-linear", r=2))
    packed = {
        name: module.weight.data.clone() for name, module in ours.base_model.named_modules() if is_quantized(module)
    }
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    run(ours, "llama-nf4").float().pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(ours.base_model.get_submodule(name).weight.data, data) for name, data in packed.items())
    expected = run(ours.eval(), "llama-nf4")
    with ours.disabled():
        assert_changed(expected, run(ours, "llama-nf4"))
    ours.save(str(tmp_path), format="peft")

    dequantized = build("llama-nf4")  # the same weights, packed the same way
    for name in packed:
        parent, _, child = name.rpartition(".")
        setattr(dequantized.get_submodule(parent), child, dequantized_linear(dequantized.get_submodule(name)))
    theirs = peft.PeftModel.from_pretrained(dequantized, str(tmp_path)).eval()
    assert_same(run(theirs, "llama-nf4"), expected)
