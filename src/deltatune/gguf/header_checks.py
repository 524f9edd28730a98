"""A GGUF file's header checked against itself, so that a damaged or hostile file is refused in one line naming
it, before anything large is built, rather than loading as another model than the file holds, hanging on a huge
count or ending in a traceback.

- `check_tensor_table`: every tensor has dimensions, rows of whole blocks and its bytes inside the file.
- `check_metadata` (before the config is built): the counts and sizes transformers reads (`COUNT_KEYS`) are
  positive whole numbers, the heads divide the width and the key-value heads divide the heads, and each count the
  tensor table shows too (`_table_counts`: the blocks `blk.N`, the token embedding's shape, the first block's
  feed-forward) is the table's.
- `check_config` (once the config is built): the same counts for a key the file lacks, where transformers took a
  default, blaming the missing key rather than the tensors.
- `check_all_used` (once the model is built): every tensor of the file has a place in the model, but for
  `LEFT_OUT`. transformers' own GGUF loader skips the others without a word, which would load two layers of
  tensors under a block count of 1 as one layer, or drop a bias llama.cpp uses; llama.cpp refuses such files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DeltaTuneError
from .header import GGUFHeader, TensorEntry
from .names import gguf_architecture

COUNT_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
    "vocab_size",
)
"""Metadata keys (after `ARCH.`) that must hold a positive whole number (or a list of whole numbers, per layer)
where transformers reads them for the file's architecture."""
HEAD_WIDTH_KEYS = ("attention.key_length", "rope.dimension_count")
"""Keys that give the width of a head; without one, the width is the embedding length over the head count."""
FEED_FORWARD_ROWS = frozenset({"llama", "qwen2", "qwen3"})
"""Architectures whose `blk.0.ffn_up.weight` holds feed_forward_length rows (others fuse or split it)."""
LEFT_OUT = {
    "rope_freqs.weight": "llama.cpp's per-frequency rotary factors; transformers computes its rotary frequencies "
    "from the config and its own GGUF loader skips this tensor",
}
"""Tensors a file may hold that the model built from it has no place for, and why that is accepted."""
LANGUAGE_MODEL_HEAD = "output.weight"
"""A file's own output head, which a model without one (a classifier, whose new head starts freshly) leaves out."""
BLOCK_NAME = re.compile(r"blk\.(\d+)\.")
SHOWN = 3
"""The unused tensors named in a refusal; the rest are counted."""


def _type_sizes(ggml_type: int) -> tuple[int, int] | None:
    """(values, bytes) of one block of `ggml_type` (1 value for the float types), None for a type gguf lacks."""
    import gguf

    return gguf.GGML_QUANT_SIZES.get(ggml_type)


def type_name(ggml_type: int) -> str:
    import gguf

    known = ggml_type in gguf.GGMLQuantizationType._value2member_map_
    return gguf.GGMLQuantizationType(ggml_type).name if known else f"ggml type {ggml_type}"


def row_width(tensor: TensorEntry) -> int:
    """Bytes of one row (the last dimension) of `tensor`, a tensor of a type gguf knows."""
    block_size, type_size = _type_sizes(tensor.ggml_type)
    return tensor.shape[-1] // block_size * type_size


def check_tensor_table(header: GGUFHeader, path: Path) -> None:
    """Refuse a tensor without dimensions, with rows that are no whole number of blocks, or past the file's end."""
    for tensor in header.tensors:
        if not tensor.shape:
            raise DeltaTuneError(f"{path.name}: tensor {tensor.name} declares no dimensions; the file is damaged")
        sizes = _type_sizes(tensor.ggml_type)
        if sizes is None:
            continue  # a type of no known size: refused by name where the model would use it
        if tensor.shape[-1] % sizes[0]:
            raise DeltaTuneError(
                f"{path.name}: tensor {tensor.name} declares rows of {tensor.shape[-1]} values, not a whole number "
                f"of {type_name(tensor.ggml_type)} blocks of {sizes[0]}; the file is damaged"
            )
        if tensor.start + math.prod(tensor.shape[:-1]) * row_width(tensor) > header.data.shape[0]:
            raise DeltaTuneError(f"{path.name} ends inside tensor {tensor.name}; the file is truncated")


def _config_keys(header: GGUFHeader) -> dict[str, str]:
    """{key after `ARCH.`: the config field transformers sets from it} for the file's architecture."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    return {part: field for part, field in GGUF_CONFIG_MAPPING.get(header.architecture, {}).items() if field != -1}


def _is_count(value: Any) -> bool:
    if isinstance(value, list):
        return all(type(item) is int and item >= 0 for item in value)
    return type(value) is int and value > 0


def _check_heads(header: GGUFHeader, path: Path, read: dict[str, str]) -> None:
    """Refuse heads that do not divide the width (where no key gives a head's width) and key-value heads that do
    not divide the heads, for the keys transformers reads (`read`)."""
    architecture, metadata = header.architecture, header.metadata
    counts = {part: metadata.get(f"{architecture}.{part}") if part in read else None for part in COUNT_KEYS}
    pairs = [("attention.head_count", "attention.head_count_kv")]
    if not any(f"{architecture}.{part}" in metadata for part in HEAD_WIDTH_KEYS):
        pairs.append(("embedding_length", "attention.head_count"))
    for whole_part, divisor_part in pairs:
        whole, divisor = counts[whole_part], counts[divisor_part]
        if type(whole) is int and type(divisor) is int and divisor > 0 and whole % divisor:
            raise DeltaTuneError(
                f"{path.name}: {architecture}.{divisor_part} {divisor} does not divide {architecture}.{whole_part} "
                f"{whole}; the metadata is damaged, write the file again"
            )


def _blocks(count: int) -> str:
    if count == 0:
        return "its tensor table holds no blk.N tensors"
    last = "" if count == 1 else f" to blk.{count - 1}"
    return f"its tensor table holds {count} block{'s' * (count > 1)} (blk.0{last})"


def _names_blocks(architecture: str) -> bool:
    """Whether GGUF `architecture` names its layers' tensors `blk.N.` (not `enc.blk.N.`, `dec.blk.N.`)."""
    import gguf

    kinds = gguf.MODEL_TENSORS.get(gguf_architecture(architecture), ())
    return any(gguf.TENSOR_NAMES.get(kind, "").startswith("blk.") for kind in kinds)


def _table_counts(header: GGUFHeader) -> dict[str, tuple[int, str]]:
    """{key after `ARCH.`: (the number the tensor table shows for it, where it shows it)}."""
    shapes = {tensor.name: tensor.shape for tensor in header.tensors}
    counts: dict[str, tuple[int, str]] = {}
    numbers = [int(found.group(1)) for name in shapes if (found := BLOCK_NAME.match(name))]
    if numbers or _names_blocks(header.architecture):
        count = max(numbers, default=-1) + 1
        counts["block_count"] = (count, _blocks(count))
    embedding = shapes.get("token_embd.weight", ())
    if len(embedding) == 2:
        counts["vocab_size"] = (embedding[0], f"token_embd.weight is {embedding}")
        counts["embedding_length"] = (embedding[1], f"token_embd.weight is {embedding}")
    feed_forward = shapes.get("blk.0.ffn_up.weight", ())
    if header.architecture in FEED_FORWARD_ROWS and len(feed_forward) == 2:
        counts["feed_forward_length"] = (feed_forward[0], f"blk.0.ffn_up.weight is {feed_forward}")
    return counts


def check_metadata(header: GGUFHeader, path: Path) -> None:
    """Refuse an architecture the gguf package does not know, a count of `COUNT_KEYS` that is no positive whole
    number, heads that do not divide, and a count or size the tensor table contradicts (naming the key, its value
    and what the table holds); all before anything is built from them."""
    architecture = header.architecture
    if gguf_architecture(architecture) is None:
        raise DeltaTuneError(
            f"{path.name} holds a model of GGUF architecture {architecture!r}, which the installed gguf package does "
            "not know: the file is damaged, or newer than the package (pip install -U gguf)"
        )
    read = _config_keys(header)
    for part in COUNT_KEYS:
        key = f"{architecture}.{part}"
        if part in read and key in header.metadata and not _is_count(header.metadata[key]):
            raise DeltaTuneError(
                f"{path.name}: {key} is {header.metadata[key]!r}, not a positive whole number; the metadata is "
                "damaged, write the file again"
            )
    _check_heads(header, path, read)
    for part, (number, where) in _table_counts(header).items():
        key = f"{architecture}.{part}"
        declared = header.metadata.get(key)
        if part in read and type(declared) is int and declared != number:
            raise DeltaTuneError(
                f"{path.name}: its metadata gives {key} {declared}, but {where}; the metadata does not match the "
                "tensors, write the file again"
            )


def check_config(header: GGUFHeader, path: Path, config: Any) -> None:
    """Refuse a config whose count or size the tensor table contradicts where the file lacks its key and
    transformers took a default (or counted it elsewhere), naming the missing key."""
    read = _config_keys(header)
    for part, (number, where) in _table_counts(header).items():
        key, field = f"{header.architecture}.{part}", read.get(part)
        if field is None or key in header.metadata or getattr(config, field, number) == number:
            continue
        raise DeltaTuneError(
            f"{path.name} has no {key} in its metadata, so transformers takes {field} {getattr(config, field)}, "
            f"but {where}; write the file again with that key"
        )


def check_all_used(header: GGUFHeader, path: Path, names: dict[str, str], model: nn.Module) -> None:
    """Refuse a file holding tensors `model` (built from its metadata) has no place for, but for `LEFT_OUT` and a
    language-model head where `model` has none."""
    has_head = model.get_output_embeddings() is not None
    unused = [
        tensor.name
        for tensor in header.tensors
        if tensor.name not in names and tensor.name not in LEFT_OUT and (has_head or tensor.name != LANGUAGE_MODEL_HEAD)
    ]
    if unused:
        shown = ", ".join(unused[:SHOWN]) + (", ..." if len(unused) > SHOWN else "")
        several = len(unused) > 1
        raise DeltaTuneError(
            f"{path.name} holds {len(unused)} tensor{'s' * several} the {type(model).__name__} built from its "
            f"metadata has no place for: {shown}; loading would drop {'them' if several else 'it'}, so the model "
            "would not be the one the file holds (write the file again, or load it with a model class that has "
            f"{'them' if several else 'it'})"
        )
