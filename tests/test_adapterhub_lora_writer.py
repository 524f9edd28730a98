"""`save(format="adapterhub")` of LoRA: a folder is written only when AdapterHub's `LoRAConfig` can
say what the adapter computes (one α/r scale, plain factors, the named attention matrices of every
layer); any other LoRA is refused with nothing written. The folders it does write are checked against
AdapterHub itself in test_adapterhub_unipelt.py (transformers 4.57 line); here, read back by deltatune
(no `adapters` needed), they give the adapted model's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.errors import AdapterFileError, UnsupportedFormatError
from test_invariants import randomize
from tiny_models import ARCHS, build, mlp

PLAIN = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

UNRECORDED = {
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa-niter": {"init_lora_weights": "pissa_niter_2"},
    "olora": {"init_lora_weights": "olora"},
    "mica": {"init_lora_weights": "mica"},
    "kasa": {"kasa_config": {}},
    "monteclora": {"monteclora_config": {}},
    "velora": {"velora_config": {}},
    "bdlora": {"use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"]}},
    "trainable-tokens": {"trainable_token_indices": [3]},
    "dora": {"use_dora": True},
    "rank-pattern": {"rank_pattern": {"q_proj": 2}},
    "alpha-pattern": {"alpha_pattern": {"q_proj": 2.0}},
    "lora-bias": {"lora_bias": True},
    "trained-biases": {"bias": "all"},
}
"""LoRA settings AdapterHub's LoRA config has no word for (other scales, starts that rewrite W or freeze a
factor, extra tensors, trained biases): each would load, in AdapterHub or here, as another model."""

LAYERS_LEFT_OUT = {
    "one-layer": {"layers_to_transform": [0]},
    "one-layer-by-pattern": {"layers_to_transform": [1], "layers_pattern": "layers"},
    "excluded-module": {"exclude_modules": ["layers.1.self_attn.v_proj"]},
    "regex-subset": {"target_modules": r".*\.0\.self_attn\.(q|v)_proj"},
}
"""LoRA placements that leave out lettered matrices of some layers, which AdapterHub's LoRA adapts in all."""

EXPRESSIBLE = {
    "random-start": {"init_lora_weights": False},
    "gaussian-start": {"init_lora_weights": "gaussian"},
    "orthogonal-start": {"init_lora_weights": "orthogonal"},
    "every-layer-listed": {"layers_to_transform": [0, 1], "lora_dropout": 0.1},
    "excluded-elsewhere": {"exclude_modules": ["mlp.down_proj"]},
}
"""LoRA settings that only choose the start (the saved factors overtake it) or that AdapterHub writes."""


def randomized(delta_model: deltatune.DeltaModel) -> deltatune.DeltaModel:
    randomize(delta_model, "task")
    return delta_model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**ARCHS["llama"].inputs(1)).logits


def refused_save(settings: dict, folder: Path) -> str:
    """The message of the refused AdapterHub save of a LoRA with `settings`; nothing may be written."""
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(**{**PLAIN, **settings}), name="task")
    with pytest.raises(UnsupportedFormatError, match="format='deltatune'") as refusal:
        delta_model.save(folder, format="adapterhub")
    assert not folder.exists()
    return str(refusal.value)


@pytest.mark.parametrize("case", list(UNRECORDED))
def test_adapterhub_save_refuses_lora_options_it_cannot_record_and_writes_nothing(case: str, tmp_path: Path) -> None:
    settings = UNRECORDED[case]
    assert next(iter(settings)) in refused_save(settings, tmp_path / "task")


@pytest.mark.parametrize("case", list(LAYERS_LEFT_OUT))
def test_adapterhub_save_refuses_lora_that_leaves_out_layers_and_writes_nothing(case: str, tmp_path: Path) -> None:
    assert "leaves out model.layers." in refused_save(LAYERS_LEFT_OUT[case], tmp_path / "task")


@pytest.mark.parametrize("case", list(EXPRESSIBLE))
def test_an_adapterhub_lora_folder_reads_back_as_the_adapted_model(case: str, tmp_path: Path) -> None:
    config = deltatune.LoraConfig(**{**PLAIN, **EXPRESSIBLE[case]})
    delta_model = randomized(deltatune.attach(build("llama"), config, name="task"))
    expected = logits(delta_model)
    with delta_model.disabled():
        assert not torch.allclose(logits(delta_model), expected, atol=1e-3)
    delta_model.save(tmp_path / "task", format="adapterhub")
    loaded = deltatune.load(build("llama"), tmp_path / "task").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)


def test_adapterhub_save_of_a_model_without_a_transformers_config_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    delta_model = deltatune.attach(mlp(), deltatune.LoraConfig(r=2, target_modules=["net.0"]))
    with pytest.raises(UnsupportedFormatError, match="transformers") as refusal:
        delta_model.save(tmp_path / "task", format="adapterhub")
    assert "\n" not in str(refusal.value) and "format='deltatune'" in str(refusal.value)
    assert not (tmp_path / "task").exists()


STRAY_TENSORS = {
    "bottleneck": "{block}.output_adapters.adapters.task.adapter_down.0.weight",
    "another-adapters-lora": "{block}.{attention}.loras.other.lora_A",
}
"""Tensors a hostile or mixed-up AdapterHub LoRA file may hold beside the adapter's own, which its config does not
describe (module paths of the arch's first block)."""
LORA_ARCHS = {
    "llama": ({"target_modules": ["q_proj", "v_proj"]}, "model.layers.0", "self_attn.q_proj"),
    "gpt2": (
        {"target_modules": ["c_attn"], "fused_slices": {"c_attn": [True, False, True]}},
        "transformer.h.0",
        "attn.c_attn",
    ),
}
"""Arch → (its LoRA placement AdapterHub can write, its first block, the adapted attention module in it)."""


@pytest.mark.parametrize("stray", list(STRAY_TENSORS))
@pytest.mark.parametrize("arch", list(LORA_ARCHS))
def test_an_adapterhub_lora_file_holding_a_tensor_its_config_does_not_describe_is_refused_by_name(
    arch: str, stray: str, tmp_path: Path
) -> None:
    """As the bottleneck and ReFT readers do: the reader takes only keys of adapter 'task''s LoRA, so a key it
    dropped would load a smaller adapter than the file holds without a word."""
    placement, block, attention = LORA_ARCHS[arch]
    folder = tmp_path / "task"
    deltatune.attach(build(arch), deltatune.LoraConfig(r=2, **placement), name="task").save(folder, format="adapterhub")
    weights = folder / "adapter.safetensors"
    tensors = load_file(weights)
    key = STRAY_TENSORS[stray].format(block=block, attention=attention)
    save_file({**tensors, key: torch.zeros(2, 32)}, weights)
    model = build(arch)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(AdapterFileError) as refusal:
        deltatune.load(model, folder)
    message = str(refusal.value)
    assert "\n" not in message and str(folder) in message and repr(key) in message
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
