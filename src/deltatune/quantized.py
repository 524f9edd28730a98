"""The table of quantized linear types a frozen base may hold, and what deltatune needs of each.

transformers replaces a model's `nn.Linear` layers by a backend's own when it loads the model with a
`quantization_config`. Their `weight` is packed storage (bitsandbytes 4-bit: uint8 of shape
(out · in / 2, 1)), so nothing may be read off its shape or dtype. Each row here gives:

- the logical `in_features` / `out_features` (the adapter's shapes come from these),
- `dequantize(module)`: the weight as a float32 (out × in) tensor, made on demand for a merge and
  never kept,
- `compute_dtype(module)`: the dtype the layer computes its output in,
- `describe(module)`: the quantization in words, for messages ("bitsandbytes 4-bit nf4, double
  quantization"),
- `saves_dequantized`: whether the library's autograd keeps the dequantized weight for backward (torchao,
  quanto); at an adapted layer the site then computes the input gradient itself (`quantized_grad`).

Rows are keyed by the type's dotted name, so the backend package is imported only by whoever built the
model (a model holding such layers has imported it already). `lookup_type` matches these names along a
module type's MRO, before its `nn.Linear` base. torchao keeps the layer a plain `nn.Linear` and makes its
weight a tensor subclass: its row is found through the weight's type (`QUANTIZED_WEIGHTS`). Both
quantized-weight backends report the logical shape and dtype on their weights.

| backend | layer type | dequantize |
|---|---|---|
| bitsandbytes 4-bit (nf4, fp4, double quantization) | `bitsandbytes.nn.Linear4bit` | `functional.dequantize_4bit` |
| bitsandbytes 8-bit (LLM.int8) | `bitsandbytes.nn.Linear8bitLt` | int8 rows × their absmax / 127 |
| optimum-quanto int8 / int4 (weights) | `optimum.quanto.nn.QLinear` | `qweight.dequantize()` |
| torchao (int8 weight-only, ...) | `nn.Linear`, weight a `TorchAOBaseTensor` | `weight.dequantize()` |
| GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) | `deltatune.gguf.GGUFLinear` | the blocks, in torch |
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .methods.base import lookup_type


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """What deltatune needs to know of one quantized linear layer type."""

    package: str
    """The package that provides the layer (named in messages)."""
    describe: Callable[[nn.Module], str]
    dequantize: Callable[[nn.Module], torch.Tensor]
    """The weight as float32 (out_features × in_features)."""
    compute_dtype: Callable[[nn.Module], torch.dtype]
    in_features: Callable[[nn.Module], int] = lambda module: module.in_features
    out_features: Callable[[nn.Module], int] = lambda module: module.out_features
    quantized_parameters: tuple[str, ...] = ("weight",)
    """The parameters held in packed storage (a merge cannot write into them); the bias stays float."""
    saves_dequantized: bool = False
    """Whether the library's own autograd saves the dequantized weight for backward; the site then gives
    the layer's input its gradient by dequantizing again in backward (`quantized_grad`)."""


def _bnb_4bit_describe(module: nn.Module) -> str:
    state = module.weight.quant_state
    quant_type = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "?")
    nested = getattr(state, "original_nested", None) if getattr(state, "packing_format_for_cpu", False) else None
    double = ", double quantization" if (nested if nested is not None else getattr(state, "nested", False)) else ""
    return f"bitsandbytes 4-bit {quant_type}{double}"


def _bnb_4bit_dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    state = weight.quant_state
    if state is None:  # not quantized yet (a layer built but never moved to its device)
        return weight.detach().float()
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a frozen layer for its CPU kernel at the first inference call (eval mode, no
        # input gradient), its block scales now plain bfloat16: the weight is the codes times those scales,
        # what the layer computes with from then on. The inverse layout rewrites the state it is given,
        # so it gets a copy and the layer keeps its own.
        data, unpacked = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        unpacked = copy.copy(unpacked)
        unpacked.nested, unpacked.offset, unpacked.state2 = False, None, None
        unpacked.absmax = state.absmax.T.reshape(-1).float()
        unpacked.dtype = torch.float32
        state = unpacked
    return bnb_functional.dequantize_4bit(data, state).float()


def _bnb_4bit_compute_dtype(module: nn.Module) -> torch.dtype:
    return module.compute_dtype or torch.float32


def _bnb_8bit_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights=True: the weight is kept in floating point
        return weight.detach().float()
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return weight.data.float() * (scale.float().view(-1, 1) / 127)


QUANTIZED_LINEARS: dict[str, QuantizedLinear] = {
    "bitsandbytes.nn.modules.Linear4bit": QuantizedLinear(
        package="bitsandbytes",
        describe=_bnb_4bit_describe,
        dequantize=_bnb_4bit_dequantize,
        compute_dtype=_bnb_4bit_compute_dtype,
    ),
    "bitsandbytes.nn.modules.Linear8bitLt": QuantizedLinear(
        package="bitsandbytes",
        describe=lambda module: "bitsandbytes 8-bit (LLM.int8)",
        dequantize=_bnb_8bit_dequantize,
        compute_dtype=lambda module: torch.float16,
    ),
}


def _quanto_describe(module: nn.Module) -> str:
    qtype = getattr(module, "weight_qtype", None)
    return f"optimum-quanto {getattr(qtype, 'name', qtype)}"


QUANTIZED_LINEARS["optimum.quanto.nn.qlinear.QLinear"] = QuantizedLinear(
    package="optimum-quanto",
    describe=_quanto_describe,
    dequantize=lambda module: module.qweight.dequantize().float(),
    compute_dtype=lambda module: module.weight.dtype,
    saves_dequantized=True,
)

QUANTIZED_LINEARS["deltatune.gguf.linear.GGUFLinear"] = QuantizedLinear(
    package="gguf",
    describe=lambda module: f"GGUF {module.type_name} blocks",
    dequantize=lambda module: module.dequantized_weight(),
    compute_dtype=lambda module: torch.float32,
)

QUANTIZED_WEIGHTS: dict[str, QuantizedLinear] = {
    "torchao.utils.TorchAOBaseTensor": QuantizedLinear(
        package="torchao",
        describe=lambda module: f"torchao {type(module.weight).__name__}",
        dequantize=lambda module: module.weight.dequantize().float(),
        compute_dtype=lambda module: module.weight.dtype,
        saves_dequantized=True,
    ),
}


def quantized_linear(module: nn.Module) -> QuantizedLinear | None:
    """The table row of `module`'s type (or of its weight's type), None for a layer that is not quantized."""
    row = lookup_type(QUANTIZED_LINEARS, type(module), default=None)
    if row is None and isinstance(module, nn.Linear):
        row = lookup_type(QUANTIZED_WEIGHTS, type(module.weight), default=None)
    return row


def is_quantized(module: nn.Module) -> bool:
    return quantized_linear(module) is not None


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain `nn.Linear` holding `module`'s dequantized weight and its bias, in `dtype`."""
    row = quantized_linear(module)
    weight = row.dequantize(module)
    plain = nn.Linear(row.in_features(module), row.out_features(module), bias=module.bias is not None)
    plain = plain.to(device=weight.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias.detach())
    plain.requires_grad_(False)
    plain.train(module.training)
    return plain
