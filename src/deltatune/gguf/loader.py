"""Build the transformers model of a GGUF file with its linear weights (and its token embedding) kept in
their quantized blocks.

1. The file's header (metadata and tensor table) is read once, from a copy-on-write memory map of the
   file (`header.py`); the config transformers' own GGUF loader builds comes from it (`config.py`). Before
   and after the config is built, the header is checked against itself and its tensor table
   (`header_checks.py`), so that a count or size the tensors contradict is refused before a model is built.
2. The model is built with its parameters on the meta device (`skeleton.py`): nothing float is allocated.
3. Tensor names are mapped to the model's as transformers' `get_gguf_hf_weights_map` maps them
   (`names.py`). Each quantized tensor (a type of `blocks.BLOCK_FORMATS`) replaces its skeleton layer
   whole: an `nn.Linear` by a `GGUFLinear`, an `nn.Embedding` by a `GGUFEmbedding`; their blocks are views
   of the file's map (no copy is read in; pages are read when first used). F32 / F16 / BF16 tensors become
   float parameters, views of the map too where their type is `dtype`. A `GGUFLinear` takes over its
   skeleton's bias, so the bias is kept (frozen) whether the file stores it before or after the weight.
4. llama.cpp stores a Llama's q and k projections with their rows permuted per head (its rotary layout:
   the two halves of each head's rows interleaved); transformers undoes that on the dequantized floats.
   Here the same permutation moves whole rows of the block array, which is exact since a row's blocks
   run along the input dimension.
5. A head tied to the embedding (no `output.weight` in the file) is a `GGUFLinear` over the embedding's
   blocks. A task head that GGUF files do not hold (a classifier's `score`) starts freshly initialised, as
   transformers starts it; a tensor the file should hold but lacks is an error, and so is a tensor of the
   file the model has no place for (but for the few of `header_checks.LEFT_OUT`).

Architectures whose tensors transformers converts in other ways after dequantizing (its
`TENSOR_PROCESSORS` other than Llama's: merged or reshaped experts, transposed GPT-2 weights...) load their
float tensors but refuse quantized ones, naming the architecture.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from .blocks import BLOCK_FORMATS
from .config import build_errors, gguf_config, unbuildable
from .embedding import GGUFEmbedding
from .header import GGUFHeader, TensorEntry, read_header
from .header_checks import check_all_used, check_config, check_metadata, check_tensor_table, row_width, type_name
from .linear import GGUFLinear
from .names import gguf_tensor_names
from .skeleton import meta_tensors, parameters_on_meta

FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
"""ggml types loaded as plain float parameters."""
ROW_PERMUTED = {"llama": {".attn_q.": "num_attention_heads", ".attn_k.": "num_key_value_heads"}}
"""Per GGUF architecture: tensor name parts whose rows llama.cpp permuted, and the config field giving
their head count."""


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise DeltaTuneError("loading a GGUF file needs the gguf package, which is not installed: pip install gguf")


def supported_types() -> str:
    floats = [type_name(kind) for kind in FLOAT_TYPES]
    return ", ".join([*floats, *(layout.name for layout in BLOCK_FORMATS.values())])


def _unpermute_rows(blocks: torch.Tensor, heads: int, tensor: TensorEntry, path: Path) -> torch.Tensor:
    """Undo llama.cpp's per-head row order: its rows (h, j, i) back to transformers' (h, i, j), i ∈ {0, 1}; rows
    that are no even number a head (no rotary pairs) are refused."""
    if blocks.shape[0] % (2 * heads):
        raise DeltaTuneError(
            f"{path.name}: tensor {tensor.name} has {blocks.shape[0]} rows, not an even number for each of its "
            f"{heads} heads, so its rotary pairs cannot be put in order; the file is damaged, write it again"
        )
    half = blocks.shape[0] // heads // 2
    return blocks.reshape(heads, half, 2, -1).transpose(1, 2).reshape(blocks.shape)


def _check_types(header: GGUFHeader, path: Path, names: dict[str, str]) -> None:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    architecture = header.architecture
    for tensor in header.tensors:
        kind = tensor.ggml_type
        if tensor.name not in names or kind in FLOAT_TYPES:
            continue
        if kind not in BLOCK_FORMATS:
            raise DeltaTuneError(
                f"{path.name}: tensor {tensor.name} is {type_name(kind)}, a type deltatune cannot keep "
                f"quantized; supported: {supported_types()} (re-quantize the file, e.g. with llama-quantize)"
            )
        if architecture in TENSOR_PROCESSORS and architecture not in ROW_PERMUTED:
            raise DeltaTuneError(
                f"{path.name}: transformers converts {architecture} tensors after dequantizing them, which cannot be "
                f"done on quantized blocks ({tensor.name} is {type_name(kind)}); quantized GGUF bases are "
                f"supported for llama and architectures stored as transformers holds them"
            )


def _check_shape(model: nn.Module, name: str, tensor: TensorEntry, path: Path) -> None:
    """Refuse a tensor whose declared shape is not that of the model's tensor `name` (built from the file's
    metadata), before anything is made of its bytes."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    expected = tuple(module._buffers.get(attribute, module._parameters.get(attribute)).shape)
    if tensor.shape != expected:
        raise DeltaTuneError(
            f"{path.name}: tensor {tensor.name} ({name}) holds {tensor.shape} values where the model its metadata "
            f"describes expects {expected}; the file's tensors do not match its metadata, write the file again"
        )


def _quantized_module(skeleton: nn.Module, blocks: torch.Tensor, tensor: TensorEntry, path: Path) -> nn.Module:
    """The block layer that replaces `skeleton` (an nn.Linear or nn.Embedding, whose weight's shape the tensor's
    has: out × in, or tokens × width)."""
    kind = tensor.ggml_type
    if isinstance(skeleton, nn.Embedding):
        return GGUFEmbedding(blocks, kind, skeleton.embedding_dim, skeleton.padding_idx)
    if isinstance(skeleton, nn.Linear):
        bias = None if skeleton.bias is None else skeleton.bias.detach()  # on meta until the file's bias comes
        return GGUFLinear(blocks, kind, skeleton.in_features, bias)
    raise DeltaTuneError(
        f"{path.name}: tensor {tensor.name} is quantized but belongs to a {type(skeleton).__name__}, not a Linear"
    )


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


def _tensor_bytes(header: GGUFHeader, tensor: TensorEntry) -> torch.Tensor:
    """The bytes of `tensor` (inside the file: `check_tensor_table`) in the file's copy-on-write map (no copy), as
    rows of its last dimension."""
    rows, width = math.prod(tensor.shape[:-1]), row_width(tensor)
    return torch.from_numpy(header.data[tensor.start : tensor.start + rows * width]).view(rows, width)


def _float_values(raw: torch.Tensor, tensor: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor's values: its bytes viewed as their type (still the file's map), then cast to `dtype`."""
    return raw.view(FLOAT_TYPES[tensor.ggml_type]).reshape(tensor.shape).to(dtype)


def load_gguf_model(
    path: str | Path,
    model_class: Any = None,
    dtype: torch.dtype = torch.float32,
    output_loading_info: bool = False,
    **config_settings: Any,
) -> nn.Module | tuple[nn.Module, dict[str, list[str]]]:
    """The model in GGUF file `path`, built with `model_class` (default `AutoModelForCausalLM`) from the
    file's config updated with `config_settings` (`num_labels`...): quantized tensors kept as blocks
    (`GGUFLinear`, `GGUFEmbedding`), float ones as `dtype` parameters; eval mode. With `output_loading_info`,
    also transformers' loading info for it (`from_pretrained(..., output_loading_info=True)`): `missing_keys`,
    the tensors no GGUF file holds and that start freshly initialised (a new task head); `unexpected_keys`
    empty (a file holding tensors the model has no place for is refused: `header_checks.check_all_used`). A
    header that disagrees with itself or its tensor table is refused before the model is built
    (`header_checks`)."""
    require_gguf()
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(f"GGUF file {path} does not exist")
    header = read_header(path)
    check_tensor_table(header, path)
    check_metadata(header, path)
    config = gguf_config(header, path, **config_settings)
    check_config(header, path, config)
    try:
        with parameters_on_meta():
            model = (model_class or AutoModelForCausalLM).from_config(config)
    except (*build_errors(), RuntimeError) as error:
        raise unbuildable(path, error) from error
    names = gguf_tensor_names(model, header.architecture)
    check_all_used(header, path, names, model)
    _check_types(header, path, names)
    permuted = ROW_PERMUTED.get(header.architecture, {})
    for tensor in header.tensors:
        if tensor.name not in names:
            continue
        name = names[tensor.name]
        _check_shape(model, name, tensor, path)
        values = _tensor_bytes(header, tensor)
        if tensor.ggml_type in FLOAT_TYPES:
            values = _float_values(values, tensor, dtype)
        heads = [field for part, field in permuted.items() if part in tensor.name]
        if heads:
            values = _unpermute_rows(values, getattr(config, heads[0]), tensor, path)
        if tensor.ggml_type in FLOAT_TYPES:
            _put_float(model, name, values)
            continue
        module_name = name.removesuffix(".weight")
        skeleton = model.get_submodule(module_name)
        model.set_submodule(module_name, _quantized_module(skeleton, values, tensor, path))
    _tie_head(model)
    missing = meta_tensors(model)
    _initialise_new(model, missing, path, set(names.values()))
    model.config._name_or_path = str(path)
    if output_loading_info:
        return model.eval(), {"missing_keys": missing, "unexpected_keys": []}
    return model.eval()
