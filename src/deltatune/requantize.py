"""From a quantized base to a full-precision checkpoint, and back to a quantized one.

A model merged with `DeltaModel.unload(merge=True, dequantize=True)` has plain float Linears where an
adapter was; every other linear layer is still quantized, and transformers still marks the model as
quantized (`config.quantization_config`, `hf_quantizer`), so `save_pretrained` would write a checkpoint
that half holds packed weights. `dequantize_model` turns the rest into plain Linears (the table of
`deltatune.quantized` dequantizes each), a quantized token embedding (a GGUF one) into a plain
`nn.Embedding`, ties again an output head that read the embedding's quantized table (a GGUF tied head),
and drops those marks: what `save_pretrained` then writes is a plain checkpoint that `from_pretrained`
loads with no quantization library at all.

`save_requantized` writes such a full-precision model as a quantized checkpoint. transformers can
serialize bitsandbytes 4-bit and 8-bit layers (packed weights, their quantization state, and a
`quantization_config` in config.json, loaded back packed as they were written); it has no way to
quantize a model it holds already. So the model is written in full precision into a temporary folder
and loaded from there with the `quantization_config`, the one way transformers itself quantizes, and
that model is saved. The checkpoint holds the 4-bit or 8-bit weights (a quarter or half of the float32
size of the linear layers), and whoever loads it gets exactly those weights. The alternative, a
full-precision folder whose config.json names a `quantization_config` to quantize at load, is not one
transformers reads: a config that holds a `quantization_config` marks a checkpoint already quantized.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .gguf.embedding import GGUFEmbedding
from .merging import storage_key
from .quantized import dequantized_linear, is_quantized

QUANTIZED_EMBEDDINGS: dict[type, Callable[[nn.Module, torch.dtype], nn.Embedding]] = {
    GGUFEmbedding: GGUFEmbedding.dequantized
}
"""Token embeddings kept quantized, and how each becomes a plain `nn.Embedding` in a dtype."""


def _dequantized(module: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """The plain float module that replaces a quantized linear layer or embedding; None for other modules."""
    if is_quantized(module):
        return dequantized_linear(module, dtype)
    embedding = QUANTIZED_EMBEDDINGS.get(type(module))
    return None if embedding is None else embedding(module, dtype)


def _head_shares_embedding_storage(model: nn.Module) -> bool:
    """Whether the output head holds a tensor of the input embedding (tied, be it by a GGUF table's blocks)."""
    if not hasattr(model, "get_output_embeddings"):
        return False
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None:
        return False
    tensors = [{storage_key(tensor) for tensor in (*m.parameters(), *m.buffers())} for m in (embedding, head)]
    return bool(tensors[0] & tensors[1])


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` with every quantized linear layer replaced by a plain `nn.Linear` holding its
    dequantized weight, a quantized token embedding by a plain `nn.Embedding` (the output head tied to it
    again where it was), all its float parameters in `dtype`, and transformers' quantization marks
    removed, so that `save_pretrained` writes a plain full-precision checkpoint. Changes `model` in
    place and returns it."""
    tied = _head_shares_embedding_storage(model)
    for name, module in list(model.named_modules()):
        plain = _dequantized(module, dtype) if name else None
        if plain is not None:
            parent_name, _, leaf = name.rpartition(".")
            model.get_submodule(parent_name).register_module(leaf, plain)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    model.to(dtype)
    if hasattr(getattr(model, "config", None), "dtype"):
        model.config.dtype = dtype
    return model


def save_requantized(
    model: Any, folder: str | Path, quantization_config: Any, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> None:
    """Write `model` (a full-precision transformers model, such as `dequantize_model` gives) into
    `folder` as a quantized checkpoint: quantized with `quantization_config` (a bitsandbytes
    `BitsAndBytesConfig`: transformers saves those layers) by loading it, onto `device` with its other
    weights in `dtype`, from a temporary full-precision copy written beside `folder` and removed after.
    `from_pretrained(folder)` then loads the quantized model with no further options."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", suffix=".full-precision", dir=folder.parent) as full:
        model.save_pretrained(full)
        quantized = type(model).from_pretrained(
            full, quantization_config=quantization_config, device_map={"": device}, dtype=dtype, local_files_only=True
        )
        quantized.save_pretrained(folder)
