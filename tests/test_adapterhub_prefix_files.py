"""AdapterHub-format prefix folders: what we write records the MLP we write, and a hostile file is refused.

AdapterHub builds a prefix's MLP `bottleneck_size` wide; a folder of ours must record the width of the MLP it
holds (ours defaults to the model's hidden size), or neither library can load it back. A weights file holding a
tensor the config does not describe, or a flat table that is no whole number of virtual-token rows, is refused
naming the tensor, as the bottleneck, LoRA and ReFT readers refuse one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from tiny_models import build

WEIGHTS = "adapter.safetensors"
MLP_PREFIX = dict(num_virtual_tokens=4, prefix_projection=True, shift_positions=False, embedding_dim="hidden_size")


def saved(tmp_path, config: deltatune.PrefixTuningConfig):
    """A GPT-2 with prefix `config` attached as "task", evaluated on a fixed batch, saved in AdapterHub's format."""
    torch.manual_seed(0)
    model = deltatune.attach(build("gpt2"), config, name="task")
    model.eval()
    batch = torch.randint(0, 90, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    model.save(tmp_path, format="adapterhub")
    return batch, expected


def edit_weights(folder, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


@pytest.mark.parametrize("encoder_hidden_size", [None, 24], ids=["default-width", "explicit-width"])
def test_an_adapterhub_save_records_the_width_of_the_prefix_mlp_it_writes(tmp_path, encoder_hidden_size) -> None:
    config = deltatune.PrefixTuningConfig(**MLP_PREFIX, encoder_hidden_size=encoder_hidden_size)
    batch, expected = saved(tmp_path, config)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())["config"]["bottleneck_size"]
    tensors = load_file(tmp_path / WEIGHTS)
    first_layer = next(tensor for key, tensor in tensors.items() if "control_trans.0.weight" in key)
    assert recorded == first_layer.shape[0]
    loaded = deltatune.load(build("gpt2"), tmp_path)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix_projection", [True, False], ids=["mlp", "flat"])
def test_a_prefix_file_holding_a_tensor_its_config_does_not_describe_is_refused_naming_it(
    tmp_path, prefix_projection
) -> None:
    fields = {**MLP_PREFIX, "prefix_projection": prefix_projection}
    saved(tmp_path, deltatune.PrefixTuningConfig(**fields))
    stray = "transformer.h.0.output_adapters.adapters.task.adapter_down.0.weight"
    edit_weights(tmp_path, lambda tensors: tensors.__setitem__(stray, torch.zeros(8, 32)))
    model = build("gpt2")
    with pytest.raises(deltatune.DeltaTuneError, match="adapter_down"):
        deltatune.load(model, tmp_path)
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]


def test_a_flat_prefix_table_of_no_whole_number_of_rows_is_refused_naming_it(tmp_path) -> None:
    saved(tmp_path, deltatune.PrefixTuningConfig(**{**MLP_PREFIX, "prefix_projection": False}))

    def grow(tensors) -> None:
        key = next(key for key in tensors if key.endswith("control_trans"))
        tensors[key] = torch.zeros(tensors[key].numel() + 1)

    edit_weights(tmp_path, grow)
    with pytest.raises(deltatune.DeltaTuneError, match="control_trans"):
        deltatune.load(build("gpt2"), tmp_path)
