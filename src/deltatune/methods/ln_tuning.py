"""LayerNorm tuning (peft's LN_TUNING; Zhao et al. 2023, arXiv:2312.11420): train a copy of each selected
norm layer's parameters, everything else frozen.

    y = norm_copy(x)       norm_copy: the layer with its own trainable γ (and β), a copy of the layer's at start

Each adapter's copy is a `ModuleCopy` (`methods/module_copy.py`, the mechanism of `modules_to_save`): it
runs in the layer's place on the layer's input, keeps the layer's dtype (peft does not upcast it either),
and in a mixed batch runs on its own rows only. Merging writes the copy's parameters over the layer's (as
the delta copy − layer, kept for unmerge), which is peft's merge (it swaps the copy in). With two of these
adapters active at one layer the last activated one's copy gives the output (peft refuses two).
peft's files name the copy's tensors `<layer path>.ln_tuning_layers.<parameter>`. peft accepts any layer
type in `target_modules`, and so does this method (a layer holding quantized weights cannot be copied).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import TargetedConfig
from ..peft_format import PeftCodec
from ..peft_keys import LN_TUNING_READ, check_method_keys
from ..registry import register
from .base import ModuleMethod
from .module_copy import ModuleCopy

DEFAULT_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "gemma"], ["input_layernorm", "post_attention_layernorm", "norm"]),
    **dict.fromkeys(["bloom", "falcon"], ["input_layernorm", "post_attention_layernorm", "ln_f"]),
    **dict.fromkeys(["t5", "mt5"], ["layer_norm", "final_layer_norm"]),
    **dict.fromkeys(["qwen2", "qwen3"], ["post_attention_layernorm"]),
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
}
"""peft 0.21's default targets per model type (`TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`)."""


@dataclasses.dataclass
class LNTuningConfig(TargetedConfig):
    """LayerNorm tuning settings, as peft's `LNTuningConfig` (`target_modules`, `exclude_modules`,
    `modules_to_save`); `target_modules=None` means peft's default norm layers for the model type."""


class NormCopy(ModuleCopy):
    """The trainable copy of one selected layer; in peft's files under `ln_tuning_layers`."""

    def __init__(self, module: nn.Module, module_name: str, config: LNTuningConfig) -> None:
        super().__init__(module, module_name)


class LNTuningPeft(PeftCodec):
    """LN tuning in peft's files: the targets as full module names, the copies' parameters by name."""

    peft_type = "LN_TUNING"
    tensor_names = {NormCopy: {"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, LN_TUNING_READ)

    def config_to_peft(self, config: LNTuningConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {"target_modules": targets, "exclude_modules": None}

    def config_from_peft(self, data: dict[str, Any]) -> LNTuningConfig:
        return LNTuningConfig(**{key: data[key] for key in LN_TUNING_READ if data.get(key) is not None})


@register("ln_tuning")
class LNTuning(ModuleMethod):
    """A trainable copy of each selected (norm) layer."""

    config_class = LNTuningConfig
    adapter_types = {nn.Module: NormCopy}
    peft_codec = LNTuningPeft()
    targets_by_model_type = DEFAULT_TARGETS
