"""LoRA on quantized frozen bases as transformers loads them from a `quantization_config`: bitsandbytes
4-bit (nf4 / fp4, double quantization) and 8-bit, optimum-quanto int8 / int4 weights, torchao int8
weight-only. Shapes from the logical layer, training that leaves the quantized storage bit-identical,
peft's outputs, both file formats, the refused merge and the dequantized unload. A backend whose package
is missing is skipped, naming it.

bitsandbytes repacks a frozen 4-bit layer for its CPU kernel at the first inference call (eval mode, no
input gradient), after which it computes through that kernel; the comparisons here run the model in
training mode (no dropout in these models), where it dequantizes and computes in float32. Its 4-bit blocks
are 64 wide, so the tiny models here are 64 wide (32 would not quantize)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltatune
from deltatune.errors import MergeError

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

VOCAB = 96
PACKAGES = {
    "nf4": "bitsandbytes",
    "fp4": "bitsandbytes",
    "int8": "bitsandbytes",
    "quanto-int8": "optimum.quanto",
    "quanto-int4": "optimum.quanto",
    "torchao-int8": "torchao",
}
# The quantized layer types (or, for torchao, weight types) each backend gives, by dotted name.
QUANTIZED_TYPES = {
    "bitsandbytes.nn.modules.Linear4bit",
    "bitsandbytes.nn.modules.Linear8bitLt",
    "optimum.quanto.nn.qlinear.QLinear",
    "torchao.utils.TorchAOBaseTensor",
}


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum)
        return False


def case(*values: str) -> pytest.param:
    """A test case on the backend of its last value, skipped (naming the package) where it is missing."""
    package = PACKAGES[values[-1]]
    reason = f"{package} is not installed (pip install deltatune[quantized])"
    return pytest.param(*values, marks=pytest.mark.skipif(not installed(package), reason=reason))


KINDS = [case(kind) for kind in PACKAGES]
needs_bitsandbytes = pytest.mark.skipif(
    not installed("bitsandbytes"), reason="bitsandbytes is not installed (pip install deltatune[quantized])"
)
LLAMA_AND_BERT = [case("llama", kind) for kind in PACKAGES] + [case("bert", "nf4"), case("bert", "quanto-int8")]


def quantization(kind: str):
    if kind.startswith("quanto-"):
        from transformers import QuantoConfig

        return QuantoConfig(weights=kind.removeprefix("quanto-"))
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )


def _names(kind: type) -> set[str]:
    return {f"{base.__module__}.{base.__qualname__}" for base in kind.__mro__}


def is_quantized_layer(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return bool((_names(type(module)) | _names(type(weight))) & QUANTIZED_TYPES)


def quantizable_llama(**settings: object) -> LlamaForCausalLM:
    """A tiny Llama 64 wide (bitsandbytes quantizes in blocks of 64), `settings` over its config."""
    config = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    return LlamaForCausalLM(LlamaConfig(**config | settings))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny fp32 Llama and BERT, saved once for the quantized loads."""
    torch.manual_seed(0)
    folders = {}
    llama = quantizable_llama()
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    for name, model in {"llama": llama, "bert": bert}.items():
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


def load(saved: dict[str, Path], arch: str, kind: str | None) -> torch.nn.Module:
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForSequenceClassification
    options = {"quantization_config": quantization(kind), "device_map": "cpu"} if kind else {}
    model = auto.from_pretrained(saved[arch], dtype=torch.float32, **options)
    return model.train()  # no dropout in these models; see the module docstring


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))}


def run(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(seed)).logits


def lora(**options) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[options.pop("arch", "llama")], **options)


TARGETS = {"llama": "all-linear", "bert": ["query", "key", "value", "dense"]}


def storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's stored weight tensors (copies): bitsandbytes' packed data, or the inner
    tensors of a quantized tensor subclass (quanto, torchao)."""
    stored = {}
    for name, module in model.named_modules():
        if is_quantized_layer(module):
            weight = module.weight
            if hasattr(weight, "__tensor_flatten__"):
                inner, _ = weight.__tensor_flatten__()
                stored.update({f"{name}.{key}": getattr(weight, key).clone() for key in inner})
            else:
                stored[name] = weight.data.clone()
    return stored


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_lora_shapes_come_from_the_logical_layer(saved, kind: str) -> None:
    quantized = deltatune.attach(load(saved, "llama", kind), lora())
    plain = deltatune.attach(load(saved, "llama", None), lora())
    assert quantized.targets["default"] == plain.targets["default"]
    assert len(quantized.targets["default"]) == 14
    for ours, reference in zip(quantized.adapter_parameters("default"), plain.adapter_parameters("default")):
        assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert quantized.trainable_summary().trainable == plain.trainable_summary().trainable == 8192


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_base_counts_its_logical_parameters(saved, kind: str) -> None:
    """A packed weight counts as in × out parameters (bitsandbytes 4-bit stores two per byte)."""
    quantized = deltatune.attach(load(saved, "llama", kind), lora()).trainable_summary()
    plain = deltatune.attach(load(saved, "llama", None), lora()).trainable_summary()
    assert (quantized.total, quantized.base) == (plain.total, plain.base)


@pytest.mark.parametrize("arch,kind", LLAMA_AND_BERT)
def test_lora_trains_and_the_packed_base_stays_bit_identical(saved, arch: str, kind: str) -> None:
    model = deltatune.attach(load(saved, arch, kind), lora(arch=arch))
    before = storage(model.base_model)
    assert before
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-2)
    batch = inputs(1)
    labels = batch["input_ids"] if arch == "llama" else torch.tensor([0, 1, 2])
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    after = storage(model.base_model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(p.requires_grad for p in model.base_model.parameters() if not p.is_floating_point())


@pytest.mark.parametrize("arch,kind", LLAMA_AND_BERT)
def test_outputs_and_both_formats_match_peft_on_the_same_quantized_base(saved, arch, kind, tmp_path: Path) -> None:
    ours = deltatune.attach(load(saved, arch, kind), lora(arch=arch, init_lora_weights=False))
    expected = run(ours)
    assert (expected - run(load(saved, arch, kind))).abs().max() > 1e-3
    ours.save(str(tmp_path / "peft"), format="peft")
    ours.save(str(tmp_path / "ours"))

    theirs = peft.PeftModel.from_pretrained(load(saved, arch, kind), str(tmp_path / "peft")).train()
    torch.testing.assert_close(run(theirs), expected, atol=1e-5, rtol=0)
    back = deltatune.load(load(saved, arch, kind), str(tmp_path / "ours"))
    torch.testing.assert_close(run(back), expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "from_peft")
    from_peft = deltatune.load(load(saved, arch, kind), str(tmp_path / "from_peft"))
    torch.testing.assert_close(run(from_peft), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_quantized_layer_is_refused_naming_the_way_out(saved, kind: str) -> None:
    model = deltatune.attach(load(saved, "llama", kind), lora(init_lora_weights=False))
    before = storage(model.base_model)
    expected = run(model)
    refusal = r"it is quantized \((bitsandbytes|optimum-quanto|torchao) .*unload\(merge=True, dequantize=True\)"
    with pytest.raises(MergeError, match=refusal):
        model.merge()
    after = storage(model.base_model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(site.merged for _, site in model.sites())
    torch.testing.assert_close(run(model), expected, atol=0, rtol=0)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The backend's own dequantization (the reference; the library has its own table)."""
    names = _names(type(module))
    if "bitsandbytes.nn.modules.Linear4bit" in names:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if "bitsandbytes.nn.modules.Linear8bitLt" in names:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).float()
    return module.weight.dequantize().float()  # quanto's and torchao's tensors


def dequantized_base(model: torch.nn.Module) -> torch.nn.Module:
    """The quantized model with every quantized layer replaced by a float32 Linear of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if is_quantized_layer(module):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(dequantized_weight(module))
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_module(leaf, plain)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_unload_dequantize_merges_into_float32_linears(saved, kind: str, tmp_path: Path) -> None:
    model = deltatune.attach(load(saved, "llama", kind), lora(init_lora_weights=False))
    unmerged = run(model)
    model.save(str(tmp_path))
    reference = deltatune.load(dequantized_base(load(saved, "llama", kind)), str(tmp_path))
    expected = run(reference)

    plain = model.unload(merge=True, dequantize=True)
    layer = plain.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert not any(is_quantized_layer(m) for m in plain.modules())  # every linear was adapted
    merged = run(plain)
    assert relative(merged, expected) < 1e-4  # the dequantized base with the adapter unmerged
    assert relative(merged, unmerged) < 1e-4  # the quantized model with the adapter unmerged


@pytest.mark.parametrize("kind", KINDS)
def test_unload_dequantize_gives_a_full_precision_model_that_saves_and_reloads(saved, kind: str, tmp_path) -> None:
    """Layers without an adapter are dequantized too: the model `save_pretrained` writes is a plain
    float32 checkpoint (no quantization_config) that reloads with the merged model's outputs."""
    config = deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = deltatune.attach(load(saved, "llama", kind), config)
    unmerged = run(model)
    plain = model.unload(merge=True, dequantize=True)
    assert not any(is_quantized_layer(module) for module in plain.modules())
    assert relative(run(plain), unmerged) < 1e-4
    plain.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
    assert relative(run(reloaded), unmerged) < 1e-4


@needs_bitsandbytes
def test_adapter_trained_on_a_4bit_base_loads_on_the_float32_model(saved, tmp_path: Path) -> None:
    model = deltatune.attach(load(saved, "llama", "nf4"), lora())
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-2)
    for _ in range(3):
        model(**inputs(1), labels=inputs(1)["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save(str(tmp_path / "ours"))
    model.save(str(tmp_path / "peft"), format="peft")

    fp32 = deltatune.load(load(saved, "llama", None), str(tmp_path / "ours"))
    for ours, theirs in zip(model.adapter_parameters("default"), fp32.adapter_parameters("default")):
        assert torch.equal(ours, theirs)
    assert (run(fp32) - run(load(saved, "llama", None))).abs().max() > 1e-3
    theirs = peft.PeftModel.from_pretrained(load(saved, "llama", None), str(tmp_path / "peft")).train()
    torch.testing.assert_close(run(fp32), run(theirs), atol=1e-5, rtol=0)


@needs_bitsandbytes
def test_dequantize_reads_the_layout_bitsandbytes_repacks_for_cpu_inference(saved) -> None:
    from deltatune.quantized import quantized_linear

    model = load(saved, "llama", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    row = quantized_linear(layer)
    before, described = row.dequantize(layer), row.describe(layer)
    assert torch.equal(before, dequantized_weight(layer))
    assert described == "bitsandbytes 4-bit nf4, double quantization"
    model.requires_grad_(False).eval()
    run(model)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this processor's bitsandbytes kernel keeps the storage as it is")
    # its block scales are bfloat16 from now on: the weight it computes with is within their rounding
    torch.testing.assert_close(row.dequantize(layer), before, rtol=8e-3, atol=1e-7)
    assert row.describe(layer) == described
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # the layer keeps its own state


@needs_bitsandbytes
def test_bitfit_trains_and_merges_on_a_4bit_bert(saved) -> None:
    model = deltatune.attach(load(saved, "bert", "nf4"), deltatune.BitFitConfig())
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters("default"))
    before = storage(model.base_model)
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=5e-2)
    labels = torch.tensor([0, 1, 2])
    losses = []
    for _ in range(8):
        loss = model(**inputs(1), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    expected = run(model)
    model.merge()  # a bias is not packed: it merges as on a float layer
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=0)
    after = storage(model.base_model)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_to_save_naming_a_quantized_layer_is_refused_with_the_way_out(saved, kind: str) -> None:
    """A full trainable copy of packed weights cannot train: refused in one sentence, the model untouched."""
    model = load(saved, "llama", kind)
    before = storage(model)
    config = deltatune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"])
    with pytest.raises(deltatune.errors.DeltaTuneError, match="o_proj is a quantized layer.*target it"):
        deltatune.attach(model, config)
    assert all(torch.equal(before[name], tensor) for name, tensor in storage(model).items())
    deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules=["q_proj"]))  # nothing of it was left
