"""deltatune's LoRA against peft's: with the same weights, the same outputs (atol 1e-5).

Every test builds the adapter on one side (peft or deltatune) with random, non-zero A and B
(`init_lora_weights=False`), moves it to the other side through an adapter folder, and compares the
two models' outputs on the same inputs: single adapters, two adapters at once, merged weights, mixed
batches, weighted combinations, per-module ranks and alphas with rsLoRA, embeddings and convolutions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

import deltatune
from deltatune.methods.lora import LoraAdapter
from deltatune.methods.module_copy import ModuleCopy
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
ARCHS = ["llama", "gpt2", "bert"]

# Modules adapted in every test but the single-adapter one (which uses "all-linear" everywhere).
TARGETS = {"llama": "all-linear", "gpt2": "all-linear", "bert": ["query", "key", "value", "dense"]}

# Per-module ranks and alphas, given as peft patterns (a suffix of the full name, read as a regex).
PATTERNS = {
    "llama": ({"q_proj": 2, "layers.1.mlp.down_proj": 6}, {"v_proj": 3, "o_proj": 5}),
    "gpt2": ({"c_attn": 2, "h.1.mlp.c_proj": 6}, {"c_fc": 3}),
    "bert": ({"query": 2, "layer.1.output.dense": 6}, {"value": 3}),
}
# A full module name each rank pattern picks, and the rank it must get.
PATTERN_PROBES = {
    "llama": {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.down_proj": 6,
        "model.layers.0.mlp.down_proj": 4,
    },
    "gpt2": {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_proj": 6, "transformer.h.0.mlp.c_proj": 4},
    "bert": {
        "bert.encoder.layer.0.attention.self.query": 2,
        "bert.encoder.layer.1.output.dense": 6,
        "bert.encoder.layer.1.attention.output.dense": 4,
    },
}


# ----------------------------------------------------------------------------- helpers
def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_same_parameter(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda message: f"{name}: {message}")


def assert_changed(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """The adapter must really change the output, or an equality check proves nothing."""
    assert (actual - reference).abs().max().item() > 1e-3


# Both build from deep copies: peft edits its config's lists in place (all-linear, task heads).
def peft_lora(targets, r: int = 4, lora_alpha: float = 8, **options) -> peft.LoraConfig:
    options = copy.deepcopy(options)
    return peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=copy.deepcopy(targets), init_lora_weights=False, **options
    )


def our_lora(targets, r: int = 4, lora_alpha: float = 8, **options) -> deltatune.LoraConfig:
    options = copy.deepcopy(options)
    return deltatune.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=copy.deepcopy(targets), init_lora_weights=False, **options
    )


def peft_model_with(base: nn.Module, configs: dict[str, peft.LoraConfig]) -> peft.PeftModel:
    """A peft model on a copy of `base` with one adapter per entry (the first is active)."""
    names = list(configs)
    model = peft.get_peft_model(copy.deepcopy(base), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    return model.eval()


def perturb_peft_saved_modules(model: nn.Module, scale: float = 0.5) -> None:
    """Give every modules_to_save copy its own weights (a fresh copy equals the original)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                for held in module.modules_to_save.values():
                    for parameter in held.parameters():
                        parameter.add_(scale * torch.randn_like(parameter))


def perturb_our_saved_modules(model: deltatune.DeltaModel, scale: float = 0.5) -> None:
    with torch.no_grad():
        for _, site in model.sites():
            for adapter in site.adapters.values():
                if isinstance(adapter, ModuleCopy):
                    for parameter in adapter.copy.parameters():
                        parameter.add_(scale * torch.randn_like(parameter))


def has_deltatune_modules(model: nn.Module) -> bool:
    return any(
        isinstance(module, (LoraAdapter, ModuleCopy)) or type(module).__name__ == "DeltaSite"
        for module in model.modules()
    )


def our_rank_at(model: deltatune.DeltaModel, module_name: str, adapter: str = "default") -> int:
    return dict(model.sites())[module_name].adapters[adapter].lora_A.shape[0]


def two_adapters(arch: str, tmp_path: Path, rank_b: int = 2, saved: bool = False):
    """peft model with adapters "a" (r 4, alpha 8) and "b" (r `rank_b`, alpha 3) saved under
    tmp_path/a and tmp_path/b, and the base model."""
    base = build(arch)
    extra = {"modules_to_save": ["classifier"]} if saved else {}
    model = peft_model_with(
        base, {"a": peft_lora(TARGETS[arch], **extra), "b": peft_lora(TARGETS[arch], r=rank_b, lora_alpha=3, **extra)}
    )
    perturb_peft_saved_modules(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    return base, model


def our_two_adapters(base: nn.Module, tmp_path: Path) -> deltatune.DeltaModel:
    """deltatune model with peft's "a" and "b", loaded one folder at a time."""
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "a"), name="a")
    same = deltatune.load(ours, str(tmp_path / "b"), name="b")
    assert same is ours and set(ours.configs) == {"a", "b"}
    return ours.eval()


# ----------------------------------------------------------------------------- one adapter
SINGLE = {
    "llama": {},
    "gpt2": {},
    "bert": {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_peft_outputs(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_model_with(base, {"default": peft_lora("all-linear", **SINGLE[arch])})
    perturb_peft_saved_modules(theirs)
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    theirs.save_pretrained(tmp_path)

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(ours, arch), expected)
    if arch == "bert":
        assert isinstance(dict(ours.sites())["classifier"].adapters["default"], ModuleCopy)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_peft_format_loads_in_peft_with_our_outputs(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    saved = copy.deepcopy(SINGLE[arch].get("modules_to_save"))
    ours = deltatune.attach(copy.deepcopy(base), our_lora("all-linear", modules_to_save=saved)).eval()
    perturb_our_saved_modules(ours)
    expected = run(ours, arch)
    assert_changed(expected, run(base, arch))
    ours.save(str(tmp_path), format="peft")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(theirs, arch), expected)
    assert sorted(theirs.targeted_module_names) == sorted(ours.targets["default"])


def test_our_peft_format_loads_in_peft_without_saved_head(tmp_path: Path) -> None:
    """A classifier adapter without modules_to_save (LoRA on the encoder only), saved for peft,
    loads in peft with our outputs (peft's own SEQ_CLS adapters always carry the head)."""
    base = build("bert")
    ours = deltatune.attach(copy.deepcopy(base), our_lora(TARGETS["bert"])).eval()
    expected = run(ours, "bert")
    assert_changed(expected, run(base, "bert"))
    ours.save(str(tmp_path), format="peft")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(run(theirs, "bert"), expected)


# ----------------------------------------------------------------------------- two adapters
@pytest.mark.parametrize("arch", ARCHS)
def test_two_active_adapters_match_peft_adapter_list(arch: str, tmp_path: Path) -> None:
    base, theirs = two_adapters(arch, tmp_path)
    ours = our_two_adapters(base, tmp_path)

    single = {}
    for name in ("a", "b"):
        theirs.base_model.set_adapter(name)
        single[name] = run(ours.activate(name), arch)
        assert_same(single[name], run(theirs, arch))

    theirs.base_model.set_adapter(["a", "b"])
    expected = run(theirs.base_model, arch)
    assert_changed(expected, single["a"])
    assert_changed(expected, single["b"])
    assert_same(run(ours.activate("a", "b"), arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_peft_merge_and_unload(arch: str, tmp_path: Path) -> None:
    base, theirs = two_adapters(arch, tmp_path)
    theirs.base_model.set_adapter(["a", "b"])
    unmerged = run(theirs.base_model, arch)
    merged_theirs = theirs.merge_and_unload()
    expected = run(merged_theirs, arch)
    assert_same(expected, unmerged)

    ours = our_two_adapters(base, tmp_path).activate("a", "b")
    ours.merge()
    assert_same(run(ours, arch), expected)
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)

    ours.unmerge()
    plain = ours.unload(merge=True)
    assert not has_deltatune_modules(plain)
    assert_same(run(plain, arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_adapter_names(arch: str, tmp_path: Path) -> None:
    saved = arch == "bert"  # the classifier head is per adapter too: per-row copies of it
    base, theirs = two_adapters(arch, tmp_path, saved=saved)
    expected = run(theirs, arch, adapter_names=["a", "b", "__base__"])

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()  # both subfolders
    assert set(ours.configs) == {"a", "b"}
    actual = run(ours, arch, adapter_names=["a", "b", None])
    assert_same(actual, expected)
    # the rows really differ: adapter a, adapter b, base model
    assert_changed(actual[0], actual[1])
    with ours.disabled():
        assert_same(actual[2], run(ours, arch)[2])


# ----------------------------------------------------------------------------- weighted adapters
@pytest.mark.parametrize("combination_type", ["cat", "linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_weighted_adapter_matches_peft_add_weighted_adapter(arch: str, combination_type: str, tmp_path: Path) -> None:
    rank_b = 2 if combination_type == "cat" else 4  # "linear" needs equal ranks
    base, theirs = two_adapters(arch, tmp_path / "pair", rank_b=rank_b)
    ours = our_two_adapters(base, tmp_path / "pair")
    weights = [0.7, -0.4]

    theirs.add_weighted_adapter(["a", "b"], weights, "c", combination_type=combination_type)
    theirs.set_adapter("c")
    expected = run(theirs, arch)
    ours.add_weighted_adapter(["a", "b"], weights, "c", combination_type=combination_type)
    ours.activate("c")
    actual = run(ours, arch)
    assert_same(actual, expected)
    assert_changed(actual, run(base, arch))

    # the combined adapter, saved in peft's format, loads in peft with the same outputs
    ours.save(str(tmp_path / "c"), names=["c"], format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "c")).eval()
    assert_same(run(reloaded, arch), expected)


def test_weighted_cat_with_unit_weights_equals_both_adapters_active(tmp_path: Path) -> None:
    """ "cat" is exact: with weights 1, 1 the combined adapter computes what a and b do together."""
    base, _ = two_adapters("llama", tmp_path, rank_b=2)
    ours = our_two_adapters(base, tmp_path)
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="cat")
    combined = run(ours.activate("c"), "llama")
    assert_same(combined, run(ours.activate("a", "b"), "llama"))


# ----------------------------------------------------------------------------- patterns, rsLoRA
@pytest.mark.parametrize("arch", ARCHS)
def test_rank_alpha_pattern_rslora_round_trip_through_peft(arch: str, tmp_path: Path) -> None:
    rank_pattern, alpha_pattern = PATTERNS[arch]
    options = {"rank_pattern": dict(rank_pattern), "alpha_pattern": dict(alpha_pattern), "use_rslora": True}
    head = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    base = build(arch)

    # peft -> deltatune
    theirs = peft_model_with(
        base, {"default": peft_lora(TARGETS[arch], task_type=SINGLE[arch].get("task_type"), **options, **head)}
    )
    perturb_peft_saved_modules(theirs)
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    theirs.save_pretrained(tmp_path / "peft")
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert_same(run(ours, arch), expected)
    for module_name, rank in PATTERN_PROBES[arch].items():
        assert our_rank_at(ours, module_name) == rank
        assert theirs.get_base_model().get_submodule(module_name).r["default"] == rank

    # deltatune -> peft (the same weights, written with resolved names)
    ours.save(str(tmp_path / "back"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert_same(run(again, arch), expected)
    for module_name in PATTERN_PROBES[arch]:
        ours_layer = dict(ours.sites())[module_name].adapters["default"]
        theirs_layer = again.get_base_model().get_submodule(module_name)
        assert theirs_layer.r["default"] == ours_layer.rank
        assert theirs_layer.scaling["default"] == pytest.approx(ours_layer.scaling)

    # an adapter made by deltatune with the same patterns
    fresh = deltatune.attach(copy.deepcopy(base), our_lora(TARGETS[arch], **options, **head)).eval()
    perturb_our_saved_modules(fresh)
    fresh_expected = run(fresh, arch)
    fresh.save(str(tmp_path / "fresh"), format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fresh")).eval()
    assert_same(run(loaded, arch), fresh_expected)


# ----------------------------------------------------------------------------- embeddings
EMBEDDING_TARGETS = {"llama": ["embed_tokens", "q_proj"], "gpt2": ["wte", "c_attn"]}


@pytest.mark.parametrize("arch", sorted(EMBEDDING_TARGETS))
def test_embedding_lora_matches_peft(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = peft_model_with(base, {"default": peft_lora(EMBEDDING_TARGETS[arch])})
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    theirs.save_pretrained(tmp_path / "peft")
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    embedding = next(name for name in ours.targets["default"] if name.endswith(EMBEDDING_TARGETS[arch][0]))
    assert type(dict(ours.sites())[embedding].adapters["default"]).__name__ == "LoraEmbedding"
    assert_same(run(ours, arch), expected)

    ours.save(str(tmp_path / "back"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert_same(run(again, arch), expected)


def test_embedding_lora_merge_matches_peft(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft_model_with(base, {"default": peft_lora(EMBEDDING_TARGETS["llama"])})
    theirs.save_pretrained(tmp_path)
    expected = run(theirs.merge_and_unload(), "llama")
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    ours.merge()
    assert_same(run(ours, "llama"), expected)
    assert_same(run(ours.unload(merge=True), "llama"), expected)


def test_tied_embedding_merge_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """GPT-2's wte is tied to lm_head: deltatune refuses to merge into it (and leaves weights as they were)."""
    base = build("gpt2")
    ours = deltatune.attach(copy.deepcopy(base), our_lora(["wte"])).eval()
    before = run(ours, "gpt2")
    with pytest.raises(deltatune.MergeError):
        ours.merge()
    assert_same(run(ours, "gpt2"), before)


# ----------------------------------------------------------------------------- convolutions
class ConvNet(nn.Module):
    """Conv2d 3x3 -> ReLU -> Conv2d 1x1 -> flatten the image -> strided Conv1d; and a strided Conv2d.
    (No dilation: peft's conv LoRA does not pass the base layer's dilation to lora_A.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1, stride=2)
        self.down = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.conv2(self.act(self.conv1(x)))
        return torch.cat([self.seq(image.flatten(2)).flatten(1), self.down(x).flatten(1)], dim=1)


CONV_TARGETS = ["conv1", "conv2", "seq", "down"]


def conv_inputs() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def conv_base() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def test_conv_lora_matches_peft(tmp_path: Path) -> None:
    base = conv_base()
    x = conv_inputs()
    theirs = peft_model_with(base, {"default": peft_lora(CONV_TARGETS, r=3, lora_alpha=5)})
    expected = theirs(x)
    assert_changed(expected, base(x))
    theirs.save_pretrained(tmp_path / "peft")
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert sorted(ours.targets["default"]) == sorted(CONV_TARGETS)
    assert_same(ours(x), expected)

    ours.save(str(tmp_path / "back"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert_same(again(x), expected)


def test_our_conv_lora_loads_in_peft(tmp_path: Path) -> None:
    base = conv_base()
    x = conv_inputs()
    ours = deltatune.attach(copy.deepcopy(base), our_lora(CONV_TARGETS, r=3, lora_alpha=5)).eval()
    expected = ours(x)
    assert_changed(expected, base(x))
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_same(theirs(x), expected)


def test_conv_merge_matches_peft_merge_and_unload(tmp_path: Path) -> None:
    base = conv_base()
    x = conv_inputs()
    theirs = peft_model_with(base, {"default": peft_lora(CONV_TARGETS, r=3, lora_alpha=5)})
    unmerged = theirs(x)
    theirs.save_pretrained(tmp_path)
    merged_theirs = theirs.merge_and_unload()
    expected = merged_theirs(x)
    assert_same(expected, unmerged)

    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    ours.merge()
    assert_same(ours(x), expected)
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)
    plain = ours.unload(merge=True)
    assert not has_deltatune_modules(plain)
    assert_same(plain(x), expected)
