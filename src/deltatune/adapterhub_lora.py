"""AdapterHub's LoRA in its files (a `LoRAConfig`, alone or as UniPELT's part), read into our `LoraConfig`.

AdapterHub adapts the self-attention matrices its `attn_matrices` letters name ("q", "k", "v") and keeps
each layer's factors under `<layer>.loras.NAME.lora_A` (r × in), `lora_B` (out × r) and, with
`use_gating`, `gate.weight` / `gate.bias`: our `lora_A`, `lora_B` and `gate` at the same layer. Its merged
attention projections (GPT-2's `c_attn`, one LoRA split over q, k and v) have no counterpart here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapterhub_options import refuse_other_options
from .errors import AdapterFileError
from .methods.lora_config import LoraConfig

ATTENTION_MATRICES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
    "mistral": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
    "bert": {"q": "query", "k": "key", "v": "value"},
    "roberta": {"q": "query", "k": "key", "v": "value"},
}
"""Model type → AdapterHub's attention-matrix letters → our module names (suffixes)."""
FIXED_OPTIONS = {
    "selfattn_lora": True,
    "intermediate_lora": False,
    "output_lora": False,
    "composition_mode": "add",
    "use_dora": False,
    "leave_out": [],
    "vera_d": None,
    "vera_b": None,
}
"""AdapterHub LoRA option: the value deltatune reads (anything else is refused)."""
MARKER = ".loras."


def lora_config_from_adapterhub(options: dict[str, Any], model: nn.Module, folder: Path) -> LoraConfig:
    """Our `LoraConfig` for AdapterHub's LoRA config dict on `model`."""
    refuse_other_options(options, FIXED_OPTIONS, folder, "LoRA")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ATTENTION_MATRICES:
        raise AdapterFileError(
            f"{folder}: deltatune reads AdapterHub LoRA on {sorted(ATTENTION_MATRICES)} models, not on {model_type!r}"
        )
    letters = list(options.get("attn_matrices", ["q", "v"]))
    if not letters or set(letters) - set(ATTENTION_MATRICES[model_type]):
        raise AdapterFileError(f"{folder}: AdapterHub LoRA attn_matrices {letters} must be among 'q', 'k', 'v'")
    return LoraConfig(
        r=options.get("r", 8),
        lora_alpha=options.get("alpha", 8),
        lora_dropout=options.get("dropout", 0.0),
        target_modules=[ATTENTION_MATRICES[model_type][letter] for letter in letters],
        use_gating=bool(options.get("use_gating", False)),
    )


def is_lora_key(key: str, name: str) -> bool:
    return f"{MARKER}{name}." in key


def lora_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Our file keys (`<layer>.<tensor>`) for the LoRA tensors of adapter `name` in AdapterHub's weights."""
    marker = f"{MARKER}{name}."
    return {key.replace(marker, "."): tensor for key, tensor in tensors.items() if marker in key}
