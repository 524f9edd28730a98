"""Gated LoRA (UniPELT, Mao et al. 2022, arXiv:2110.07577; AdapterHub's LoRA `use_gating`): a learned gate
of the layer's input takes the place of the scaling s:

    y = W x + b + g · B A dropout(x),     g = mean_t σ(W_g x_t + b_g)   (`gating`), one value per example

on `nn.Linear` and GPT-2's `Conv1D` layers (plain LoRA's `LoraLinear`, whose forward it reuses for the
low-rank term). g depends on the input, so the delta has no fixed ΔW: not mergeable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaTuneError, MergeError, UnsupportedModuleError
from .base import lookup_type
from .gating import gate_value, make_gate
from .lora import Lora, LoraLinear
from .lora_config import PLAIN_STARTS, LoraConfig

EXCLUSIVE_OPTIONS = ("use_dora", "kasa_config", "use_bdlora", "lora_bias", "velora_config", "target_parameters")
"""LoRA options that change the layer the gate would wrap: refused beside `use_gating`."""


def check_gating_options(config: LoraConfig) -> None:
    """`use_gating` goes with plain LoRA (its own init, no other layer form)."""
    if not config.use_gating:
        return
    taken = [name for name in EXCLUSIVE_OPTIONS if getattr(config, name) not in (None, False)]
    if taken or not (isinstance(config.init_lora_weights, bool) or config.init_lora_weights in PLAIN_STARTS):
        raise DeltaTuneError(
            f"use_gating (a gated LoRA) goes with plain LoRA layers; turn off {taken or ['init_lora_weights']}"
        )


class GatedLoraLinear(LoraLinear):
    """`LoraLinear` whose low-rank term is multiplied by a gate of its input instead of s."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        super().__init__(module, module_name, config)
        self.scaling = 1.0  # the gate takes its place (AdapterHub); dropout's 1/(1-p) still rides on it
        self.gate = make_gate(self.lora_A.shape[1], 1, self.lora_A)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden, up, scaling = self.low_rank_terms(args[0])
        gate = self.per_output_feature(gate_value(self.gate, args[0].to(hidden.dtype)))
        term = torch.matmul(hidden, up.t()) * (scaling * gate)
        return output + term.to(output.dtype)

    def per_output_feature(self, values: torch.Tensor) -> torch.Tensor:
        """The gate's values for the output features: one head, the same for all (`lora_fused`: a head per part)."""
        return values

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        raise MergeError("a gated LoRA's delta depends on its input (its gate); it cannot be merged into the weights")


def build_gated(module: nn.Module, module_name: str, config: LoraConfig) -> GatedLoraLinear:
    if lookup_type(Lora.adapter_types, type(module), None) is not LoraLinear:
        raise UnsupportedModuleError(
            f"{module_name}: a gated LoRA (use_gating) runs on nn.Linear and Conv1D layers, not on a "
            f"{type(module).__name__}"
        )
    return GatedLoraLinear(module, module_name, config)
