"""An adapter folder records the base weights it was trained on (`deltatune.base_fingerprint`): loading it
onto a base with other weights warns naming the modules that differ, `strict=True` refuses, and its own
base (also saved and loaded back in another dtype, or quantized) loads silently."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import deltatune
from deltatune.base_fingerprint import SAMPLE_SIZE
from tiny_models import build, llama, run

CONFIG = deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
FORMATS = ["deltatune", "peft"]


def _saved_adapter(tmp_path: Path, format: str, base: torch.nn.Module | None = None) -> Path:
    delta_model = deltatune.attach(base if base is not None else build("llama"), CONFIG)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = tmp_path / f"adapter-{format}"
    delta_model.save(str(folder), format=format)
    return folder


def _silent_load(model: torch.nn.Module, folder: Path, **options) -> deltatune.DeltaModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return deltatune.load(model, str(folder), **options)


def test_recorded_signs_and_orders_are_the_documented_sample_of_the_weights(tmp_path: Path) -> None:
    model = build("llama")
    folder = _saved_adapter(tmp_path, "deltatune", model)
    recorded = json.loads((folder / "adapter_config.json").read_text())["base_fingerprint"]["modules"]
    module = model.model.layers[1].self_attn.q_proj
    values = module.weight.detach().reshape(-1)  # the plain computation: the weight alone (no bias), row-major
    positions = [(2 * k + 1) * values.numel() // (2 * SAMPLE_SIZE) for k in range(SAMPLE_SIZE)]
    expected = "".join({1.0: "+", -1.0: "-", 0.0: "0"}[float(torch.sign(values[p]))] for p in positions)
    orders = "".join({1.0: "+", -1.0: "-", 0.0: "0"}[float(torch.sign(values[p] - values[p + 1]))] for p in positions)
    assert recorded["model.layers.1.self_attn.q_proj"].split(" ")[1:] == [expected, orders]
    assert sorted(recorded) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))


@pytest.mark.parametrize("format", FORMATS)
def test_loading_onto_its_own_base_is_silent(format: str, tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, format)
    _silent_load(build("llama"), folder)


@pytest.mark.parametrize("format", FORMATS)
def test_loading_onto_a_base_with_other_weights_warns_naming_the_modules(format: str, tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, format)
    with pytest.warns(deltatune.BaseWeightsWarning, match=r"4 of its 4 adapted modules differ"):
        deltatune.load(build("llama", seed=1), str(folder))
    changed = build("llama")
    with torch.no_grad():
        changed.model.layers[1].self_attn.v_proj.weight.neg_()
    with pytest.warns(deltatune.BaseWeightsWarning) as caught:
        delta_model = deltatune.load(changed, str(folder))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "1 of its 4 adapted modules differ (model.layers.1.self_attn.v_proj)" in message
    assert "load it onto the model it was trained on" in message
    assert "default" in delta_model.configs  # a warning, not a refusal


@pytest.mark.parametrize("format", FORMATS)
def test_strict_refuses_other_weights_and_leaves_the_model_as_it_was(format: str, tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, format)
    other = build("llama", seed=1)
    before = run(other, "llama")
    with pytest.raises(deltatune.BaseWeightsError, match=r"other base weights .* nothing was loaded"):
        deltatune.load(other, str(folder), strict=True)
    assert not any("deltatune" in name for name, _ in other.named_modules())
    assert torch.equal(run(other, "llama"), before)
    _silent_load(build("llama"), folder, strict=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_own_base_saved_and_loaded_back_in_another_dtype_loads_silently(dtype: torch.dtype, tmp_path: Path) -> None:
    """Rounding to another float dtype never flips a sign (float16 may round tiny values to zero, which
    matches either sign), so the base after a save/load round trip in `dtype` is still the adapter's."""
    base = build("llama")
    folder = _saved_adapter(tmp_path, "deltatune", base)
    build("llama").to(dtype).save_pretrained(tmp_path / "base")
    reloaded = type(base).from_pretrained(tmp_path / "base", dtype=dtype)
    _silent_load(reloaded, folder, strict=True)
    _silent_load(type(base).from_pretrained(tmp_path / "base", dtype=torch.float32), folder, strict=True)


def test_an_old_folder_without_a_fingerprint_loads_silently(tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, "deltatune")
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    del data["base_fingerprint"]
    config_file.write_text(json.dumps(data))
    _silent_load(build("llama", seed=1), folder, strict=True)


def test_a_resaved_adapter_keeps_the_base_it_was_trained_on(tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, "deltatune")
    with pytest.warns(deltatune.BaseWeightsWarning):
        moved = deltatune.load(build("llama", seed=1), str(folder))
    moved.save(str(tmp_path / "again"))
    _silent_load(build("llama"), tmp_path / "again", strict=True)


def test_peft_format_keeps_the_fingerprint_out_of_the_config_peft_reads(tmp_path: Path) -> None:
    """peft's config reader warns of keys its config class lacks; every reader of the weights skips the
    safetensors metadata, where the peft folder records the fingerprint."""
    peft = pytest.importorskip("peft")
    folder = _saved_adapter(tmp_path, "peft")
    assert "base_fingerprint" not in json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as file:
        assert "base_fingerprint" in file.metadata()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(build("llama"), str(folder)).eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message) or "fingerprint" in str(w.message)]
    ours = deltatune.load(build("llama"), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(run(peft_model, "llama"), run(ours, "llama"), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_adapter_loads_silently_onto_its_full_precision_base(tmp_path: Path) -> None:
    """On a quantized layer only the names and logical shapes are recorded (no signs): the 4-bit base and
    the float base it was quantized from are one base."""
    from tiny_models import _saved_llama_64, llama_nf4

    folder = _saved_adapter(tmp_path, "deltatune", llama_nf4())
    recorded = json.loads((folder / "adapter_config.json").read_text())["base_fingerprint"]["modules"]
    assert all(" " not in entry for entry in recorded.values())  # no signs on quantized layers
    full = type(llama(64)).from_pretrained(_saved_llama_64(), dtype=torch.float32)
    _silent_load(full, folder, strict=True)
    with warnings.catch_warnings():  # another shape: refused by the shape check, before any fingerprint
        warnings.simplefilter("error", deltatune.BaseWeightsWarning)
        with pytest.raises(deltatune.AdapterShapeError):
            deltatune.load(build("llama"), str(folder))


@pytest.mark.parametrize(
    "config",
    [deltatune.FullConfig(), deltatune.LoraConfig(r=2, target_modules=["query", "classifier"])],
    ids=["full", "lora-on-the-head"],
)
def test_a_fresh_task_head_is_not_part_of_the_fingerprint(config: deltatune.DeltaConfig, tmp_path: Path) -> None:
    """A task model loaded from a plain encoder gets a random head on every load: the same base loads
    silently, and the print names the encoder's modules only."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    settings = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(settings).save_pretrained(tmp_path / "encoder")

    def task_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return BertForSequenceClassification.from_pretrained(tmp_path / "encoder").eval()

    delta_model = deltatune.attach(task_model(1), config)
    delta_model.save(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_fingerprint"]["modules"]
    assert recorded and not [name for name in recorded if name.split(".")[0] == "classifier"]
    _silent_load(task_model(2), tmp_path / "adapter", strict=True)


def _positive_norms(seed: int) -> torch.nn.Module:
    """A tiny Llama whose RMSNorm weights are positive and differ with `seed`, as a pretrained model's do."""
    model = build("llama", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(0.05 + 2.0 * torch.rand(parameter.shape, generator=generator))
    return model


def test_norm_layers_of_another_base_are_seen_though_their_weights_are_all_positive(tmp_path: Path) -> None:
    """Every sampled sign of a norm's weight is `+` in any checkpoint: the print also records the order of
    neighbouring values, so LN tuning (whose targets are the norms alone) trained on one base warns on another."""
    delta_model = deltatune.attach(_positive_norms(0), deltatune.LNTuningConfig())
    delta_model.save(str(tmp_path / "ln"))
    with pytest.warns(deltatune.BaseWeightsWarning, match=r"adapted modules differ"):
        deltatune.load(_positive_norms(1), str(tmp_path / "ln"))
    with pytest.raises(deltatune.BaseWeightsError):
        deltatune.load(_positive_norms(1), str(tmp_path / "ln"), strict=True)
    _silent_load(_positive_norms(0), tmp_path / "ln", strict=True)
    _silent_load(_positive_norms(0).to(torch.bfloat16), tmp_path / "ln", strict=True)  # order survives rounding


def test_a_folder_of_the_signs_only_scheme_is_still_compared_by_its_signs(tmp_path: Path) -> None:
    """A folder saved before the order was recorded (scheme `deltatune-signs-32`: digest and signs) is compared
    by what it records: silent on its own base, a warning naming the modules on another."""
    folder = _saved_adapter(tmp_path, "deltatune")
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    modules = data["base_fingerprint"]["modules"]
    data["base_fingerprint"] = {
        "scheme": "deltatune-signs-32",
        "modules": {name: " ".join(entry.split(" ")[:2]) for name, entry in modules.items()},
    }
    config_file.write_text(json.dumps(data))
    _silent_load(build("llama"), folder, strict=True)
    with pytest.warns(deltatune.BaseWeightsWarning, match=r"4 of its 4 adapted modules differ"):
        deltatune.load(build("llama", seed=1), str(folder))
