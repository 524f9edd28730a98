"""A GGUF file's header read once, straight from a memory map of the file: its metadata and its tensor
table, with nothing of the tensor data read or copied.

Layout (GGUF v2 / v3, little-endian): the magic `GGUF`, the version (u32), the tensor count and the
metadata count (u64 each); the metadata entries (a key string, a value type (u32), the value); the tensor
table (per tensor: its name, given once, the number of dimensions (u32), the dimensions fastest first (u64 each), the
ggml type (u32) and the offset of its data in the data section (u64)); the data section, which starts at
the next multiple of `general.alignment` (32 by default). A string is its byte length (u64) and its UTF-8
bytes; an array is its element type (u32), its length (u64) and its elements.

Arrays of strings (a tokenizer's vocabulary and merges: most of a small model's metadata) are walked over
but not decoded: `string_arrays` keeps their lengths only. Everything else is decoded to Python values
(numeric arrays as lists)."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeltaTuneError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""Metadata value type → its `struct` format (little-endian, fixed size)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: `shape` in torch order (slowest first), `start` its first byte in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int


@dataclasses.dataclass
class GGUFHeader:
    """The metadata (`metadata`, and the lengths of its string arrays in `string_arrays`), the tensor table
    in file order, and the file as a copy-on-write uint8 memory map (`data`: writes never reach the file)."""

    metadata: dict[str, Any]
    string_arrays: dict[str, int]
    tensors: list[TensorEntry]
    data: np.ndarray

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Cursor:
    """Reads values one after the other from a buffer, little-endian."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer, self.position, self.path = buffer, 0, path

    def damaged(self, what: str) -> DeltaTuneError:
        return DeltaTuneError(f"{self.path.name} {what}; the file is truncated, damaged or not GGUF")

    def unpack(self, form: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from("<" + form, self.buffer, self.position)
        except struct.error:
            raise self.damaged("ends inside its header") from None
        self.position += struct.calcsize("<" + form)
        return values

    def skip(self, length: int) -> int:
        """Move past `length` bytes that must lie inside the file; the position they started at."""
        if length > len(self.buffer) - self.position:
            raise self.damaged(f"declares a string of {length} bytes at byte {self.position}, past its end")
        start, self.position = self.position, self.position + length
        return start

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start = self.skip(length)
        try:
            return bytes(self.buffer[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged(f"holds a string at byte {start} that is not UTF-8") from None

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (length,) = self.unpack("Q")
            self.skip(length)

    def value(self, value_type: int) -> Any:
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type])[0]
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type in SCALAR_FORMATS:
                return list(self.unpack(f"{count}{SCALAR_FORMATS[element_type]}"))
            return [self.value(element_type) for _ in range(count)]
        raise DeltaTuneError(f"{self.path.name} holds a metadata value of unknown type {value_type}; it is not GGUF")


def read_header(path: Path) -> GGUFHeader:
    """The header of GGUF file `path` (see the module docstring); a file that is not GGUF v2 / v3 is refused."""
    if path.stat().st_size < len(MAGIC):
        raise DeltaTuneError(f"{path.name} is not a GGUF file: it holds {path.stat().st_size} bytes")
    data = np.memmap(path, dtype=np.uint8, mode="c")
    cursor = _Cursor(memoryview(data), path)
    if bytes(cursor.buffer[:4]) != MAGIC:
        raise DeltaTuneError(f"{path.name} is not a GGUF file (it does not start with {MAGIC!r})")
    cursor.position = 4
    version, tensor_count, metadata_count = cursor.unpack("IQQ")
    if version not in VERSIONS:
        raise DeltaTuneError(
            f"{path.name} is GGUF version {version}; deltatune reads little-endian versions "
            f"{' and '.join(map(str, VERSIONS))} (convert it again with a current llama.cpp)"
        )
    metadata: dict[str, Any] = {}
    string_arrays: dict[str, int] = {}
    for _ in range(metadata_count):
        key = cursor.string()
        if key in metadata or key in string_arrays:
            raise DeltaTuneError(
                f"{path.name} gives the metadata key {key} twice, so which value is the model's is unknown "
                "(llama.cpp and the gguf package refuse it too); write the file again"
            )
        (value_type,) = cursor.unpack("I")
        if value_type == ARRAY and cursor.unpack("I")[0] == STRING:
            (string_arrays[key],) = cursor.unpack("Q")
            cursor.skip_strings(string_arrays[key])
            continue
        if value_type == ARRAY:
            cursor.position -= 4  # the element type, read again by value()
        metadata[key] = cursor.value(value_type)
    entries = []
    named: set[str] = set()
    for _ in range(tensor_count):
        name = cursor.string()
        if name in named:
            raise DeltaTuneError(
                f"{path.name} names the tensor {name} twice in its tensor table, so which copy is the model's is "
                "unknown (llama.cpp and the gguf package refuse it too); write the file again"
            )
        named.add(name)
        (dimensions,) = cursor.unpack("I")
        shape = tuple(reversed(cursor.unpack(f"{dimensions}Q")))
        ggml_type, offset = cursor.unpack("IQ")
        entries.append((name, shape, ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0:
        raise cursor.damaged(f"gives general.alignment {alignment!r}, not a positive whole number")
    if alignment & (alignment - 1):
        raise cursor.damaged(f"gives general.alignment {alignment}, not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    tensors = [TensorEntry(name, shape, kind, data_start + offset) for name, shape, kind, offset in entries]
    if not isinstance(metadata.get("general.architecture"), str):
        raise DeltaTuneError(f"{path.name} has no general.architecture name in its metadata; it is not a model file")
    return GGUFHeader(metadata, string_arrays, tensors, data)
