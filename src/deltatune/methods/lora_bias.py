"""LoRA's bias options, as peft's: `lora_bias` (a trained bias on B) and `bias` (the base's biases train).

    y = W x + b + s · (B A x + b_B) + Δb

`lora_bias=True`: B gets a bias b_B (zero at start; peft's `lora_B.bias`), scaled with B. `bias="lora_only"`:
the biases of the LoRA-adapted layers train; `bias="all"`: every bias of the model (LayerNorms too), as
peft's. Merging adds s·b_B + Δb into the layer's bias (a layer without one gets one, as BitFit's
`add_missing_bias` merges).

deltatune never rewrites the base: a trained bias is b + Δb, with Δb (zero at start) held by the
adapter, so `disabled()` gives the base model back (peft's disabled adapter keeps its trained biases)
and several adapters keep their own. Files store what peft stores, the trained bias b + Δb (peft's
`<layer>.base_layer.bias` at a LoRA layer, `<module>.bias` elsewhere), and loading takes Δb = stored − b
with the b of the model it loads onto: the adapter then has the stored bias on any base, as in peft.
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

TRAINED_BIAS = "base_bias"
"""The name, in a LoRA adapter's `file_state()`, of the trained bias b + Δb."""


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
    """Give a LoRA adapter b_B (`lora_bias`) and Δb (`bias` other than "none", where the layer has a bias)."""
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
        adapter.bias_delta = nn.Parameter(torch.zeros(features, **factory))
        adapter.register_buffer("bias_original", base_bias.detach().clone(), persistent=False)
    adapter.has_output_bias = adapter.lora_B_bias is not None or adapter.bias_delta is not None


def output_bias(adapter: LoraAdapter) -> torch.Tensor:
    """s·b_B + Δb, the vector the adapter adds along the layer's output features."""
    terms = []
    if adapter.lora_B_bias is not None:
        terms.append(adapter.lora_B_bias * adapter.scaling)
    if adapter.bias_delta is not None:
        terms.append(adapter.bias_delta)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def bias_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """{"bias": s·b_B + Δb} for merging, or nothing."""
    return {"bias": output_bias(adapter).detach().float()} if adapter.has_output_bias else {}


def stored_state(state: dict[str, torch.Tensor], original: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A state with Δb (`bias_delta`) replaced by the trained bias b + Δb (`TRAINED_BIAS`) for files."""
    if "bias_delta" not in state:
        return state
    state = dict(state)
    state[TRAINED_BIAS] = original.to(state["bias_delta"].dtype) + state.pop("bias_delta").detach()
    return state


def adapter_state(tensors: dict[str, torch.Tensor], original: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The inverse of `stored_state`: Δb = stored − b."""
    if TRAINED_BIAS not in tensors:
        return tensors
    tensors = dict(tensors)
    stored = tensors.pop(TRAINED_BIAS)
    tensors["bias_delta"] = stored - original.to(stored.dtype)
    return tensors


class TrainedBias(BiasDelta):
    """`bias="all"`: the trained bias of a module LoRA does not adapt; Δb in memory, b + Δb in files."""

    def __init__(self, module: nn.Module, module_name: str) -> None:
        super().__init__(module, module_name, None)
        self.register_buffer("original", module.bias.detach().clone(), persistent=False)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"bias": self.original.to(self.bias.dtype) + self.bias.detach()}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.bias.copy_(tensors["bias"] - self.original.to(tensors["bias"].dtype))


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
