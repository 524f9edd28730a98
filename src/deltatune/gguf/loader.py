"""Build the transformers model of a GGUF file with its linear weights (and its token embedding) kept in
their quantized blocks.

1. The config comes from the file's metadata, read by transformers (`AutoConfig.from_pretrained(...,
   gguf_file=...)`), so it is the config transformers' own GGUF loader builds.
2. The model is built with its parameters on the meta device (`skeleton.py`): nothing float is allocated.
3. Tensor names are mapped to the model's by transformers' `get_gguf_hf_weights_map`. Each quantized
   tensor (a type of `blocks.BLOCK_FORMATS`) replaces its skeleton layer whole: an `nn.Linear` by a
   `GGUFLinear`, an `nn.Embedding` by a `GGUFEmbedding`; their blocks are the file's bytes, mapped
   copy-on-write (no copy is read in). F32 / F16 / BF16 tensors become plain float parameters. A
   `GGUFLinear` takes over its skeleton's bias, so the bias is kept (frozen) whether the file stores it
   before or after the weight.
4. llama.cpp stores a Llama's q and k projections with their rows permuted per head (its rotary layout:
   the two halves of each head's rows interleaved); transformers undoes that on the dequantized floats.
   Here the same permutation moves whole rows of the block array, which is exact since a row's blocks
   run along the input dimension.
5. A head tied to the embedding (no `output.weight` in the file) is a `GGUFLinear` over the embedding's
   blocks. A task head that GGUF files do not hold (a classifier's `score`) starts freshly initialised, as
   transformers starts it; a tensor the file should hold but lacks is an error.

Architectures whose tensors transformers converts in other ways after dequantizing (its
`TENSOR_PROCESSORS` other than Llama's: merged or reshaped experts, transposed GPT-2 weights...) load their
float tensors but refuse quantized ones, naming the architecture.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DeltaTuneError
from .blocks import BLOCK_FORMATS
from .embedding import GGUFEmbedding
from .linear import GGUFLinear
from .skeleton import meta_tensors, parameters_on_meta

FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
"""ggml types loaded as plain float parameters."""
ROW_PERMUTED = {"llama": {".attn_q.": "num_attention_heads", ".attn_k.": "num_key_value_heads"}}
"""Per GGUF architecture: tensor name parts whose rows llama.cpp permuted, and the config field giving
their head count."""


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise DeltaTuneError("loading a GGUF file needs the gguf package, which is not installed: pip install gguf")


def supported_types() -> str:
    return ", ".join([*FLOAT_TYPES.values(), *(layout.name for layout in BLOCK_FORMATS.values())])


def _unpermute_rows(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order: its rows (h, j, i) back to transformers' (h, i, j), i ∈ {0, 1}."""
    half = blocks.shape[0] // heads // 2
    return blocks.reshape(heads, half, 2, -1).transpose(1, 2).reshape(blocks.shape)


def _check_types(reader: Any, path: Path, names: dict[str, str], architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    for tensor in reader.tensors:
        kind = int(tensor.tensor_type)
        if tensor.name not in names or kind in FLOAT_TYPES:
            continue
        if kind not in BLOCK_FORMATS:
            raise DeltaTuneError(
                f"{path.name}: tensor {tensor.name} is {tensor.tensor_type.name}, a type deltatune cannot keep "
                f"quantized; supported: {supported_types()} (re-quantize the file, e.g. with llama-quantize)"
            )
        if architecture in TENSOR_PROCESSORS and architecture not in ROW_PERMUTED:
            raise DeltaTuneError(
                f"{path.name}: transformers converts {architecture} tensors after dequantizing them, which cannot be "
                f"done on quantized blocks ({tensor.name} is {tensor.tensor_type.name}); quantized GGUF bases are "
                f"supported for llama and architectures stored as transformers holds them"
            )


def _architecture(reader: Any) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _quantized_module(skeleton: nn.Module, blocks: torch.Tensor, kind: int, name: str) -> nn.Module:
    """The block layer that replaces `skeleton` (an nn.Linear or nn.Embedding), checked against its shape."""
    if isinstance(skeleton, nn.Embedding):
        replacement = GGUFEmbedding(blocks, kind, skeleton.embedding_dim, skeleton.padding_idx)
        expected = (skeleton.num_embeddings, skeleton.embedding_dim)
        found = (replacement.num_embeddings, replacement.embedding_dim)
    elif isinstance(skeleton, nn.Linear):
        bias = None if skeleton.bias is None else skeleton.bias.detach()  # on meta until the file's bias comes
        replacement = GGUFLinear(blocks, kind, skeleton.in_features, bias)
        expected = (skeleton.out_features, skeleton.in_features)
        found = (replacement.out_features, replacement.in_features)
    else:
        raise DeltaTuneError(f"tensor {name} is quantized but belongs to a {type(skeleton).__name__}, not a Linear")
    if found != expected:
        raise DeltaTuneError(f"tensor {name} holds {found} values where the model expects {expected}")
    return replacement


def _put_float(model: nn.Module, name: str, values: torch.Tensor) -> None:
    """Put `values` in place of the (meta) tensor `name`, a parameter keeping its `requires_grad` (a
    `GGUFLinear`'s bias stays frozen)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._buffers:
        module._buffers[attribute] = values
    else:
        placeholder = module._parameters.get(attribute)
        trainable = True if placeholder is None else placeholder.requires_grad
        module._parameters[attribute] = nn.Parameter(values, requires_grad=trainable)


def _tie_head(model: nn.Module) -> None:
    """Give a tied output head the embedding's table: its blocks (a `GGUFLinear` view) or its parameter."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not getattr(head, "weight", torch.empty(0)).is_meta:
        return
    if isinstance(embedding, GGUFEmbedding):
        model.set_output_embeddings(embedding.tied_head())
    else:
        head.weight = embedding.weight


def _initialise_new(model: nn.Module, missing: list[str], path: Path, expected: set[str]) -> None:
    """Initialise the parameters no GGUF file holds (a new task head); refuse the ones this file lacks."""
    lacking = [name for name in missing if name in expected]
    if lacking:
        raise DeltaTuneError(f"{path.name} has no tensor for {', '.join(lacking[:3])} ({len(lacking)} in all)")
    for module_name in dict.fromkeys(name.rpartition(".")[0] for name in missing):
        module = model.get_submodule(module_name)
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            model._init_weights(module)


def _gguf_names(model: nn.Module) -> dict[str, str]:
    """transformers' map of GGUF tensor names to the model's parameter names (its signature differs:
    transformers 5 takes a tensor processor, 4.57 none)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters:
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor

        return get_gguf_hf_weights_map(model, TensorProcessor())
    return get_gguf_hf_weights_map(model)


def load_gguf_model(
    path: str | Path, model_class: Any = None, dtype: torch.dtype = torch.float32, **config_settings: Any
) -> nn.Module:
    """The model in GGUF file `path`, built with `model_class` (default `AutoModelForCausalLM`) from the
    file's config updated with `config_settings` (`num_labels`...): quantized tensors kept as blocks
    (`GGUFLinear`, `GGUFEmbedding`), float ones as `dtype` parameters; eval mode."""
    require_gguf()
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(f"GGUF file {path} does not exist")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **config_settings)
    with parameters_on_meta():
        model = (model_class or AutoModelForCausalLM).from_config(config)
    reader = gguf.GGUFReader(str(path), mode="c")
    architecture = _architecture(reader)
    names = _gguf_names(model)
    _check_types(reader, path, names, architecture)
    permuted = ROW_PERMUTED.get(architecture, {})
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        name, kind = names[tensor.name], int(tensor.tensor_type)
        if kind in FLOAT_TYPES:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
            heads = [field for part, field in permuted.items() if part in tensor.name]
            tensor_values = torch.from_numpy(np.array(values, dtype=np.float32))
            if heads:
                tensor_values = _unpermute_rows(tensor_values, getattr(config, heads[0]))
            _put_float(model, name, tensor_values.to(dtype))
            continue
        blocks = torch.from_numpy(tensor.data)
        heads = [field for part, field in permuted.items() if part in tensor.name]
        if heads:
            blocks = _unpermute_rows(blocks, getattr(config, heads[0]))
        module_name = name.removesuffix(".weight")
        model.set_submodule(module_name, _quantized_module(model.get_submodule(module_name), blocks, kind, name))
    _tie_head(model)
    _initialise_new(model, meta_tensors(model), path, set(names.values()))
    model.config._name_or_path = str(path)
    return model.eval()
