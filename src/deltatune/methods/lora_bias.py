"""LoRA's bias options, as peft's: `lora_bias` (a trained bias on B) and `bias` (the base's biases train).

    y = W x + b + s · (B A x + b_B) + Δb

`lora_bias=True`: B gets a bias b_B (zero at start; peft's `lora_B.bias`), scaled with B. `bias="lora_only"`:
the biases of the LoRA-adapted layers train; `bias="all"`: every bias of the model (LayerNorms too), as
peft's. Merging adds s·b_B + Δb into the layer's bias (a layer without one gets one, as BitFit's
`add_missing_bias` merges).

deltatune never rewrites the base: the adapter holds the trained bias b' (a copy of b at start) and
adds Δb = b' − b to the layer's output, so `disabled()` gives the base model back (peft's disabled
adapter keeps its trained biases) and several adapters keep their own. Files store b' as peft stores it
(`<layer>.base_layer.bias` at a LoRA layer, `<module>.bias` elsewhere); b is the bias of the model the
adapter is on, so a loaded adapter has the stored bias on any base, as in peft.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..targeting import model_modules
from .base import lookup_type
from .bitfit import FEATURE_AXIS, BiasDelta

if TYPE_CHECKING:
    from .lora import LoraAdapter, LoraConfig


def check_bias_options(config: LoraConfig) -> None:
    """peft's rules for `lora_bias`, and DoRA, whose adapters do not take these terms here."""
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise DeltaTuneError(
            f"lora_bias=True needs init_lora_weights=True or False (as in peft), got {config.init_lora_weights!r}"
        )
    if config.use_dora and (config.lora_bias or config.bias != "none"):
        raise DeltaTuneError(
            "lora_bias and bias='all'/'lora_only' are not implemented with DoRA (peft refuses lora_bias with "
            "DoRA too); set use_dora=False or leave the biases frozen"
        )


def add_bias_terms(adapter: LoraAdapter, module: nn.Module, module_name: str, config: LoraConfig) -> None:
    """Give a LoRA adapter b_B (`lora_bias`) and b' (`bias` other than "none", where the layer has a bias)."""
    if not config.lora_bias and config.bias == "none":
        return
    if not hasattr(adapter, "has_output_bias"):  # LoRA on bare parameters and MultiheadAttention
        raise UnsupportedModuleError(
            f"lora_bias and bias='all'/'lora_only' are not supported with LoRA on {type(module).__name__} "
            f"({module_name}); leave it out of target_modules or keep lora_bias=False and bias='none'"
        )
    factory = {"dtype": adapter.lora_B.dtype, "device": adapter.lora_B.device}
    features = adapter.lora_B.shape[0]
    if config.lora_bias:
        if not adapter.takes_lora_bias:
            raise UnsupportedModuleError(
                f"lora_bias=True is not supported on {type(module).__name__} layers ({module_name}), as in peft; "
                "leave that layer out of target_modules or set lora_bias=False"
            )
        bias = torch.zeros(features, **factory)
        if config.init_lora_weights is False:  # random, as peft's B (an nn.Linear of fan-in r) starts
            bound = 1 / math.sqrt(adapter.rank)
            nn.init.uniform_(bias, -bound, bound)
        adapter.lora_B_bias = nn.Parameter(bias)
    base_bias = getattr(module, "bias", None)
    if config.bias != "none" and isinstance(base_bias, nn.Parameter):
        adapter.trained_bias = nn.Parameter(base_bias.detach().to(**factory, copy=True))
        adapter.register_buffer("base_bias", base_bias.detach().clone(), persistent=False)
    adapter.has_output_bias = adapter.lora_B_bias is not None or adapter.trained_bias is not None


def output_bias(adapter: LoraAdapter) -> torch.Tensor:
    """s·b_B + b' − b, the vector the adapter adds along the layer's output features."""
    terms = []
    if adapter.lora_B_bias is not None:
        terms.append(adapter.lora_B_bias * adapter.scaling)
    if adapter.trained_bias is not None:
        terms.append(adapter.trained_bias - adapter.base_bias.to(adapter.trained_bias.dtype))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def bias_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """{"bias": s·b_B + b' − b} for merging, or nothing."""
    return {"bias": output_bias(adapter).detach().float()} if adapter.has_output_bias else {}


class TrainedBias(BiasDelta):
    """`bias="all"`: the trained bias b' (`bias`) of a module LoRA does not adapt, added as b' − b."""

    def __init__(self, module: nn.Module, module_name: str) -> None:
        super().__init__(module, module_name, None)
        with torch.no_grad():
            self.bias.copy_(module.bias)
        self.register_buffer("base_bias", module.bias.detach().clone(), persistent=False)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        delta = (self.bias - self.base_bias.to(self.bias.dtype)).to(output.dtype)
        if self.feature_axis == 1:
            delta = delta.view(-1, *([1] * (output.dim() - 2)))
        return output + delta

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"bias": self.bias.detach().float() - self.base_bias.float()}


def trained_biases(model: nn.Module, config: LoraConfig, taken: set[str], saved: list[str]) -> dict[str, TrainedBias]:
    """`bias="all"`: a `TrainedBias` at every module with a bias, but those in `taken` (LoRA's layers, whose
    adapters hold theirs) and those inside `saved` (`modules_to_save`, trained whole)."""
    if config.bias != "all":
        return {}
    found = {}
    for name, module in model_modules(model):
        inside_saved = any(name == entry or name.startswith(entry + ".") for entry in saved)
        if name in taken or inside_saved or not isinstance(module._parameters.get("bias"), nn.Parameter):
            continue
        if lookup_type(FEATURE_AXIS, type(module), None) is None:
            raise UnsupportedModuleError(
                f"bias='all' trains every bias, and {name!r} ({type(module).__name__}) has one that deltatune cannot "
                "train as a delta (it trains the biases of linear, convolution and LayerNorm layers); use "
                "bias='lora_only', or BitFit with target_modules"
            )
        found[name] = TrainedBias(module, name)
    return found
