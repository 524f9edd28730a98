"""Data-driven adapter initialisation in `deltatune train`: an adapter whose config asks for it (LoRA
with init_lora_weights "eva" or "corda") starts from the layer inputs of the first batches of the
training data (`eva_config.batches` / `corda_config.batches` of them, `batch_size` examples each, in
file order), before the first step. A resumed run does the same on the same data (the result is a
deterministic function of it), so the adapter has the shapes its checkpoint was saved with; the
checkpoint's weights then replace it."""

from __future__ import annotations

from typing import Any

import torch

from ..methods.lora_data_init import data_batch_count, initialize_from_data, needs_data
from ..model import DeltaModel
from .encode import collate


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
