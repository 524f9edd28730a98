"""`quantize:`: load the frozen base with its linear layers quantized, as transformers does from a
`quantization_config`. The table holds one row per name the config accepts:

| name | backend | what the base's linear layers become |
|---|---|---|
| nf4 | bitsandbytes | `Linear4bit`, 4-bit NormalFloat, double quantization (QLoRA: Dettmers et al., 2023) |
| fp4 | bitsandbytes | `Linear4bit`, 4-bit float, double quantization |
| int8 | bitsandbytes | `Linear8bitLt` (LLM.int8: Dettmers et al., 2022) |
| torchao-int8 | torchao | `nn.Linear` with an int8 weight-only tensor |
| quanto-int8 | optimum-quanto | `QLinear`, int8 weights |
| quanto-int4 | optimum-quanto | `QLinear`, int4 weights |
| gguf | gguf | `deltatune.gguf.GGUFLinear`: a GGUF file's own blocks (Q4_0, Q4_1, Q8_0, K-quants...) kept as they are |

The 4-bit layers compute in float32 by default: on CPUs without native bfloat16 a bf16 matmul is
emulated and slow. `gguf` is no transformers quantization: the model is a GGUF file (`model: smollm2`, whose
package ships one, or `model: path/to/file.gguf`) built by `deltatune.gguf.load_gguf_model` with its linear
weights and token embedding left in the file's blocks, dequantized block-wise in each forward and backward.
Every backend is optional (`pip install 'deltatune[quantized]'`); a missing one
stops the run before the model loads, with one line naming what to install.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError


@dataclasses.dataclass(frozen=True)
class QuantizeOption:
    """One `quantize:` name: the package it needs and how to make its transformers config."""

    module: str
    """The import name of the backend package."""
    install: str
    """The distribution to install where it is missing."""
    make: Callable[[torch.dtype], Any] | None
    """The transformers `quantization_config`, given the compute dtype; None for `gguf`, which loads the
    file's own blocks (`deltatune.gguf`)."""


def _bitsandbytes_4bit(quant_type: str) -> Callable[[torch.dtype], Any]:
    def make(compute_dtype: torch.dtype) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )

    return make


def _bitsandbytes_8bit(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(compute_dtype: torch.dtype) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _quanto(weights: str) -> Callable[[torch.dtype], Any]:
    def make(compute_dtype: torch.dtype) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig(weights=weights)

    return make


QUANTIZE_OPTIONS: dict[str, QuantizeOption] = {
    "nf4": QuantizeOption("bitsandbytes", "bitsandbytes", _bitsandbytes_4bit("nf4")),
    "fp4": QuantizeOption("bitsandbytes", "bitsandbytes", _bitsandbytes_4bit("fp4")),
    "int8": QuantizeOption("bitsandbytes", "bitsandbytes", _bitsandbytes_8bit),
    "torchao-int8": QuantizeOption("torchao", "torchao", _torchao_int8),
    "quanto-int8": QuantizeOption("optimum.quanto", "optimum-quanto", _quanto("int8")),
    "quanto-int4": QuantizeOption("optimum.quanto", "optimum-quanto", _quanto("int4")),
    "gguf": QuantizeOption("gguf", "gguf", None),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum for optimum.quanto)
        return False


def require_backend(name: str) -> QuantizeOption:
    """The row of `quantize: name`, after checking its package is installed (one-line error if not)."""
    if name not in QUANTIZE_OPTIONS:
        raise DeltaTuneError(f"quantize: {name!r} is not one of {', '.join(QUANTIZE_OPTIONS)}")
    option = QUANTIZE_OPTIONS[name]
    if not _installed(option.module):
        raise DeltaTuneError(
            f"quantize: {name} needs the {option.install} package, which is not installed: "
            f"pip install {option.install} (or pip install 'deltatune[quantized]')"
        )
    return option


def quantization_config(name: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers `quantization_config` for `quantize: name`."""
    return require_backend(name).make(compute_dtype)


def own_unquantized_tensors(model: nn.Module) -> None:
    """Copy the floating tensors a quantized load left as they were (embeddings, norms, the head) into
    memory of their own. transformers can leave them as views into the memory-mapped checkpoint, which
    keeps the whole file mapped and every page read while quantizing resident: after an nf4 load of
    SmolLM2 the process held 502 MiB of file pages (its float32 size) beside 72 MiB of 4-bit weights;
    with these 113 MiB copied the mapping closes (bench/README.md, "Quantized bases")."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and type(tensor.data) is torch.Tensor:  # not a quantized subclass
                tensor.data = tensor.data.clone()
