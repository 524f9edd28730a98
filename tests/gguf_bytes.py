"""GGUF files written byte by byte (`struct`), for tests that make one field of a file hostile in a way the gguf
package's writer refuses or tidies away: a metadata key given twice, a size stored as text, a tensor of no
dimensions, a table that disagrees with the metadata.

`write_tiny_gguf` writes an F32 Llama of one block by default, 16 wide (2 heads of 8, one key-value head, a
feed-forward of 32), 32 tokens, its head tied to the embedding. Its metadata (`tiny_metadata`) and its tensor
table (`tiny_tensors`) can be changed entry by entry before it is written."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

UINT32, INT32, FLOAT32, BOOL, STRING, UINT64 = 4, 5, 6, 7, 8, 10
SCALAR_FORMATS = {UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?", UINT64: "Q"}
"""Metadata value type → its `struct` format (the types these tests write)."""
VOCAB, HIDDEN, FEED_FORWARD, HEADS, KV_HEADS = 32, 16, 32, 2, 1
ALIGNMENT = 32

Shape = tuple[int, ...]


def text(value: str | bytes) -> bytes:
    """A GGUF string: its byte length (u64) and its bytes."""
    raw = value if isinstance(value, bytes) else value.encode()
    return struct.pack("<Q", len(raw)) + raw


def metadata_entry(key: str, value_type: int, value: object) -> bytes:
    """One encoded metadata entry: the key, the value type (u32) and the value (a string or a scalar)."""
    encoded = text(value) if value_type == STRING else struct.pack("<" + SCALAR_FORMATS[value_type], value)
    return text(key) + struct.pack("<I", value_type) + encoded


def tiny_metadata(
    architecture: str = "llama", changes: dict[str, tuple[int, object] | None] | None = None
) -> list[bytes]:
    """The tiny Llama's metadata entries. `changes` maps the part of a key after the architecture
    (`embedding_length`, `attention.head_count`) to a new (value type, value), or to None to leave the key out;
    a part the file does not have yet is added at the end."""
    entries: dict[str, tuple[int, object] | None] = {
        "general.architecture": (STRING, architecture),
        "general.name": (STRING, "tiny"),
        **{
            f"{architecture}.{part}": value
            for part, value in {
                "context_length": (UINT32, 64),
                "embedding_length": (UINT32, HIDDEN),
                "block_count": (UINT32, 1),
                "feed_forward_length": (UINT32, FEED_FORWARD),
                "attention.head_count": (UINT32, HEADS),
                "attention.head_count_kv": (UINT32, KV_HEADS),
                "rope.freq_base": (FLOAT32, 10000.0),
                "attention.layer_norm_rms_epsilon": (FLOAT32, 1e-5),
                "vocab_size": (UINT32, VOCAB),
                **(changes or {}),
            }.items()
        },
    }
    return [metadata_entry(key, *value) for key, value in entries.items() if value is not None]


def tiny_tensors(layers: int = 1) -> list[tuple[str, Shape]]:
    """(name, shape in torch order) of the tiny Llama's tensors, `layers` blocks of them."""
    head_width = HIDDEN // HEADS
    table = [("token_embd.weight", (VOCAB, HIDDEN)), ("output_norm.weight", (HIDDEN,))]
    for block in range(layers):
        table += [
            (f"blk.{block}.{name}.weight", shape)
            for name, shape in {
                "attn_norm": (HIDDEN,),
                "attn_q": (HIDDEN, HIDDEN),
                "attn_k": (KV_HEADS * head_width, HIDDEN),
                "attn_v": (KV_HEADS * head_width, HIDDEN),
                "attn_output": (HIDDEN, HIDDEN),
                "ffn_norm": (HIDDEN,),
                "ffn_gate": (FEED_FORWARD, HIDDEN),
                "ffn_up": (FEED_FORWARD, HIDDEN),
                "ffn_down": (HIDDEN, FEED_FORWARD),
            }.items()
        ]
    return table


def gguf_bytes(metadata: list[bytes], tensors: list[tuple[str, Shape]]) -> bytes:
    """A GGUF v3 file of these encoded metadata entries and these F32 tensors (seeded random values), the data
    section and each tensor starting at a multiple of `ALIGNMENT`."""
    table, data = b"", b""
    generator = np.random.default_rng(0)
    for name, shape in tensors:
        table += text(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        table += struct.pack("<IQ", 0, len(data))
        data += generator.standard_normal(int(np.prod(shape)), dtype=np.float32).tobytes()
        data += b"\0" * (-len(data) % ALIGNMENT)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(metadata) + table
    return header + b"\0" * (-len(header) % ALIGNMENT) + data


def write_tiny_gguf(
    path: Path, metadata: list[bytes] | None = None, tensors: list[tuple[str, Shape]] | None = None
) -> Path:
    """The tiny Llama (or these entries and tensors instead of its own) written to `path`."""
    metadata = tiny_metadata() if metadata is None else metadata
    path.write_bytes(gguf_bytes(metadata, tiny_tensors() if tensors is None else tensors))
    return path
