"""What a folder's adapter must agree with in its own weights file before anything of it is built: its task
record (`check_task_against_file`: the heads it rebuilds, their label names) and its config's sizes
(`check_ranks`: ranks, bottleneck and prompt-MLP widths). A shape the folder's JSON gives is so never allocated
before it is compared with the tensors the file holds (or the layers it adapts), and a contradictory folder is
one `AdapterFileError` naming it, with the model unchanged."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .architectures import sublayer_output_width
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterFileError, TargetNotFoundError
from .methods.base import ModuleMethod
from .methods.bottleneck import BottleneckConfig, placed_sites
from .peft_format import PeftLayout
from .quantized import quantized_linear
from .registry import method_for
from .task_record import file_problem

if TYPE_CHECKING:
    from .adapter_tensors import ReadAdapter


def check_task_against_file(read: ReadAdapter, model: nn.Module, folder: Path) -> None:
    """Refuse (`AdapterFileError`) a task record of the adapter `read` from `folder` that contradicts its weights
    file or `model` (`task_record.file_problem`): nothing is built or changed before."""
    if not read.task:
        return
    shapes = {key: list(tensor.shape) for key, tensor in read.tensors.items()}
    problem = file_problem(read.task, model, shapes, _head_key_prefix(read))
    if problem is not None:
        raise AdapterFileError(
            f"{folder} records a task that contradicts its weights or this model ({problem}); save the adapter "
            "again, or delete that record to load the adapter without it"
        )


def _head_key_prefix(read: ReadAdapter) -> str:
    """What comes before `<head>.<parameter>` in the weights file's key of a head's parameter: peft's prefix of
    its `modules_to_save` copies, nothing in ours."""
    return read.layout.codec.model_prefix if isinstance(read.layout, PeftLayout) else ""


SIZE_FIELDS = ("r", "init_r", "bottleneck_size", "encoder_hidden_size")
"""Config fields that give an inner width of an adapter's tensors: a rank (the rows or columns of its factors), a
bottleneck's size, a prompt MLP's hidden width; as do the whole-number values of a `rank_pattern` and a
bottleneck's hidden size // `reduction_factor`."""


def check_ranks(read: ReadAdapter, model: nn.Module, folder: Path) -> None:
    """Refuse (`AdapterFileError`) a config, or a part of a composed one, whose size field (`SIZE_FIELDS`) exceeds
    the widest layer its adapter is built on (`_built_width`) and every dimension of the folder's tensors but
    those kept of an embedding or output head (`_embedding_modules`). A saved adapter's size is a dimension of
    its tensors in the file, or, where a factor is kept whole (LoKr's r at least half its width), no larger than
    the layer it adapts; a folder beyond both contradicts itself, and building its adapter first could ask for
    far more memory than the model has (r = 10⁹ on a 32-wide layer is 128 GB; a vocabulary-wide r on
    Llama-3-8B's every linear layer, 1.3 TB)."""
    embeddings = _embedding_modules(model)
    file_width = max(
        (max(tensor.shape, default=1) for key, tensor in read.tensors.items() if not _held_under(key, embeddings)),
        default=1,
    )
    layer_width = max(
        (_module_width(module) for name, module in model.named_modules() if not _held_under(name, embeddings)),
        default=1,
    )
    for prefix, part in _parts(read.config):
        sizes = _sizes(part, model, prefix)
        if not sizes:
            continue
        label, size = max(sizes.items(), key=lambda item: item[1])
        bound = max(_built_width(part, model, layer_width), file_width)
        if size > bound:
            raise AdapterFileError(
                f"{folder} configures {label}, beyond the widest layer its adapter is built on and every dimension "
                f"of its weights, which is {bound}: the file does not hold an adapter of that size; save it again"
            )


def _parts(config: DeltaConfig, prefix: str = "") -> Iterator[tuple[str, DeltaConfig]]:
    """`config` and, depth first, the configs it composes (MAM's and UniPELT's parts), each with its field path."""
    yield prefix, config
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, DeltaConfig):
            yield from _parts(value, f"{prefix}{field.name}.")


def _sizes(part: DeltaConfig, model: nn.Module, prefix: str) -> dict[str, int]:
    """What each size field of `part` says (a label naming the field and its value → the width it builds)."""
    fields = {field: getattr(part, field, None) for field in SIZE_FIELDS}
    pattern = getattr(part, "rank_pattern", None) or {}  # AdaLoRA's holds kept masks, not ranks
    fields |= {f"rank_pattern[{key!r}]": value for key, value in pattern.items()}
    sizes = {f"{prefix}{field}={value}": value for field, value in fields.items() if _is_count(value)}
    if isinstance(part, BottleneckConfig) and part.bottleneck_size is None:
        sites = placed_sites(model, part)
        if sites:
            size = part.size_for(sublayer_output_width(model, model.get_submodule(sites[0].output)))
            sizes[f"{prefix}reduction_factor={part.reduction_factor} (a bottleneck {size} wide)"] = size
    return sizes


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _built_width(part: DeltaConfig, model: nn.Module, layer_width: int) -> int:
    """The widest layer `part`'s adapter is built on: of the modules it targets, or, for a method placed otherwise
    (at blocks, sublayers, attention caches, bare parameters), of the model's layers, embeddings aside."""
    method = method_for(part)
    targeted = isinstance(part, TargetedConfig) and part.target_modules and isinstance(method, ModuleMethod)
    if not targeted or getattr(part, "target_parameters", None):
        return layer_width
    try:
        selected = method.select(model, part)
    except TargetNotFoundError:  # the build names what matches nothing, and the task record a missing head
        return layer_width
    return max((_module_width(model.get_submodule(name)) for name in selected), default=layer_width)


def _module_width(module: nn.Module) -> int:
    """The largest dimension of `module`'s own weights, a quantized linear's logical in/out features included (its
    stored weight is packed)."""
    row = quantized_linear(module)
    widths = [row.in_features(module), row.out_features(module)] if row is not None else []
    widths += [size for parameter in module.parameters(recurse=False) for size in parameter.shape]
    return max(widths, default=1)


def _embedding_modules(model: nn.Module) -> set[str]:
    """Names of `model`'s embeddings (token and position tables) and output head, whose vocabulary-wide rows no
    adapter's inner width is built on."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if isinstance(module, nn.Embedding) or module is output}


def _held_under(key: str, modules: set[str]) -> bool:
    """Whether a module name or a weights file's key (any format's prefix before it) lies in one of `modules`."""
    dotted = f".{key}."
    return any(f".{module}." in dotted for module in modules)
