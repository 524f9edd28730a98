"""A folder's config never sizes an allocation its weights file cannot hold (`folder_checks.check_ranks`): every
inner width of an adapter's tensors that the JSON gives (a rank r / init_r / rank_pattern value, a bottleneck's
size or hidden // reduction_factor, a prompt MLP's hidden width), in the folder's own config or a composed one's
parts, is bounded by the widest layer the adapter is built on (the modules it targets; the model's layers, its
embeddings aside, for a method placed otherwise) and the dimensions of the file's tensors (those kept of an
embedding or an output head aside). Beyond that bound the folder contradicts itself, and building its adapter
first could ask for terabytes: it is one `AdapterFileError` naming the folder and the field, with the model as
it was. The reference for "as it was" is the model's own state before the load; for the sizes the file does
hold, the adapted model's outputs before the save."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.errors import AdapterFileError
from test_invariants import randomize
from tiny_models import build, run


def _wide_vocabulary_llama() -> LlamaForCausalLM:
    """A tiny Llama whose vocabulary (4096) is far wider than its layers (32 and 64)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _refused_unchanged(build_model: Callable[[], torch.nn.Module], folder: Path, match: str) -> None:
    """Loading `folder` onto a fresh model is refused in one line matching `match`; the model keeps its state."""
    model = build_model()
    before = _state(model)
    with pytest.raises(AdapterFileError, match=match) as refusal:
        deltatune.load(model, str(folder))
    assert "\n" not in str(refusal.value)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert model.state_dict().keys() == before.keys()


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    edit(data)
    config_file.write_text(json.dumps(data))


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_a_config_rank_beyond_the_widest_targeted_layer_and_the_file_is_refused_before_the_adapter_is_built(
    format: str, tmp_path: Path
) -> None:
    """r = 10**9 would allocate 10**9 x 32 floats (128 GB) per factor; the file's lora_A is 2 x 32 and the query
    layers it adapts are 32 x 32, so no adapter of that rank can be the one the file holds."""
    folder = tmp_path / "adapter"
    deltatune.attach(build("bert"), deltatune.LoraConfig(r=2, target_modules=["query"])).save(
        str(folder), format=format
    )
    _edit_config(folder, lambda data: (data["config"] if format == "deltatune" else data).update(r=10**9))
    _refused_unchanged(lambda: build("bert"), folder, f"{folder} configures r=1000000000, .* which is 32: ")


@pytest.mark.parametrize("head", [False, True], ids=["lora", "lora-and-its-lm-head-copy"])
def test_a_vocabulary_sized_rank_is_refused_though_the_model_and_the_file_hold_a_tensor_that_wide(
    head: bool, tmp_path: Path
) -> None:
    """The embeddings (4096 rows) and a kept lm_head copy in the file are not what a LoRA on q_proj is built on:
    r = 4000 < 4096 is beyond its 32-wide layer and its 4 x 32 factors (on Llama-3-8B with all-linear, an edited
    r = 128000 so passed the old bound and asked for 1.3 TB)."""
    folder = tmp_path / "adapter"
    config = deltatune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"] if head else None)
    deltatune.attach(_wide_vocabulary_llama(), config).save(str(folder))
    _edit_config(folder, lambda data: data["config"].update(r=4000))
    _refused_unchanged(_wide_vocabulary_llama, folder, f"{folder} configures r=4000, .* which is 32: ")


def _set(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of the saved config that sets the field at `path` (under "config") to `value`."""

    def edit(data: dict[str, Any]) -> None:
        section = data["config"]
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value

    return edit


SIZE_EDITS = {
    "bottleneck_size": (deltatune.BottleneckConfig(bottleneck_size=4), ("bottleneck_size",), 10**12),
    "reduction_factor": (deltatune.BottleneckConfig(reduction_factor=8.0), ("reduction_factor",), 1e-12),
    "prefix-encoder_hidden_size": (
        deltatune.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8),
        ("encoder_hidden_size",),
        10**12,
    ),
    "p-tuning-encoder_hidden_size": (
        deltatune.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8),
        ("encoder_hidden_size",),
        10**12,
    ),
    "mam-adapter-bottleneck_size": (
        deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 4, "encoder_hidden_size": 8}),
        ("adapter", "bottleneck_size"),
        10**12,
    ),
    "unipelt-lora-r": (deltatune.UniPELTConfig(), ("lora", "r"), 10**9),
    "adalora-init_r": (deltatune.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"]), ("init_r",), 10**9),
    "lora-rank_pattern": (
        deltatune.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 3}),
        ("rank_pattern", "q_proj"),
        10**9,
    ),
}
"""Size field → (a config with it, where the saved config holds it, a value no weights file of that adapter can
hold: each asks for at least 10⁹ floats per tensor)."""


@pytest.mark.parametrize("case", list(SIZE_EDITS))
def test_a_size_field_beyond_every_width_is_refused_by_name_before_the_adapter_is_built(
    case: str, tmp_path: Path
) -> None:
    config, path, value = SIZE_EDITS[case]
    folder = tmp_path / "adapter"
    deltatune.attach(build("llama"), config).save(str(folder))
    _edit_config(folder, _set(*path, value=value))
    _refused_unchanged(lambda: build("llama"), folder, f"{folder} configures {path[0]}")


SIZES_THE_FILE_HOLDS = {
    "lora-rank-above-the-layer-width": deltatune.LoraConfig(r=48, target_modules=["q_proj"]),
    "bottleneck-wider-than-every-layer": deltatune.BottleneckConfig(reduction_factor=0.25),
    "prefix-mlp-wider-than-every-layer": deltatune.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=100
    ),
    "vera-default-rank": deltatune.VeraConfig(target_modules=["q_proj", "v_proj"]),
    "lokr-factor-kept-whole": deltatune.LoKrConfig(r=16, alpha=16, target_modules=["q_proj"]),
}
"""Sizes beyond the model's layer widths that the file's tensors hold (a LoRA of rank 48 on a 32-wide layer, a
bottleneck of 128 on a model whose widest layer is 64, VeRA's r = 256), and LoKr's rank where it keeps its
factor whole (r = 16 ≥ half the 8-wide factor: the file holds no tensor 16 wide, but q_proj is 32 wide)."""


@pytest.mark.parametrize("case", list(SIZES_THE_FILE_HOLDS))
def test_a_size_the_file_or_the_adapted_layer_holds_loads_with_the_adapted_outputs(case: str, tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("llama"), SIZES_THE_FILE_HOLDS[case])
    randomize(delta_model, "default")
    with torch.no_grad():
        expected = run(delta_model.eval(), "llama")
    delta_model.save(str(tmp_path / "adapter"))
    loaded = deltatune.load(build("llama"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "llama"), expected, atol=1e-6, rtol=0)
