"""Adapter starts in `deltatune train` that need the run, before the first step. From data (LoRA with
init_lora_weights "eva" or "corda"): the layer inputs of the first batches of the training data
(`eva_config.batches` / `corda_config.batches` of them, `batch_size` examples each, in file order).
From the float weights ("loftq", with `quantize`): the rank-r fit of the quantization error, the float
weights read from the model folder. A resumed run does the same again (a deterministic function of the
data and weights), so the adapter has the shapes its checkpoint was saved with; the checkpoint's
weights then replace it."""

from __future__ import annotations

from typing import Any

import torch

from ..methods.lora_data_init import data_batch_count, initialize_from_data, needs_data
from ..methods.lora_loftq import replace_lora_weights_loftq
from ..model import DeltaModel
from .config import ConfigError, TrainConfig
from .encode import collate
from .models import model_folder


def start_from_data(
    delta_model: DeltaModel, features: list[dict[str, Any]], batch_size: int, pad_id: int, name: str = "default"
) -> None:
    """Run the adapter's data-driven init on the first batches of `features`; nothing for other inits.
    The generator's state is kept, so the run's draws do not depend on the init."""
    config = delta_model.configs[name]
    if not needs_data(config):
        return
    device = next(delta_model.base_model.parameters()).device
    starts = range(0, min(len(features), data_batch_count(config) * batch_size), batch_size)
    batches = (
        {key: value.to(device) for key, value in collate(features[start : start + batch_size], pad_id).items()}
        for start in starts
    )
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        initialize_from_data(delta_model, batches, name)


def start_from_weights(delta_model: DeltaModel, config: TrainConfig, name: str = "default") -> None:
    """LoftQ's start on the quantized base (init_lora_weights "loftq"); nothing for other inits."""
    if getattr(delta_model.configs[name], "init_lora_weights", None) != "loftq":
        return
    if config.quantize is None:
        raise ConfigError(
            "init_lora_weights: loftq fits the adapter to the quantization error of a quantized base; set quantize "
            "(nf4, int8, ...), or use another init on a full-precision base"
        )
    replace_lora_weights_loftq(delta_model, model_folder(config.model), name)
