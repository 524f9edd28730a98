"""GGUF block formats, dequantized in torch from the raw block bytes (the layouts of ggml's `ggml-common.h`).

A quantized GGUF row of n values is n / block_size blocks of type_size bytes each, one after the other
along the input dimension. Every function here takes a uint8 tensor of whole blocks (blocks × type_size)
and returns float32 (blocks × block_size), all blocks at once. fp16 fields are read by viewing their two
bytes as float16 (GGUF files are little-endian, as are the machines torch runs on).

| type | bytes / block | values | dequantized value |
|---|---|---|---|
| Q4_0 | 18 = d(f16) + 16 | 32 | d · (q − 8), q 4-bit: low nibbles are values 0-15, high nibbles 16-31 |
| Q4_1 | 20 = d + m (f16) + 16 | 32 | d · q + m |
| Q5_0 | 22 = d + qh(4) + 16 | 32 | d · (q − 16), q = nibble + 16 · (bit of qh) |
| Q5_1 | 24 = d + m + qh(4) + 16 | 32 | d · q + m, q as for Q5_0 |
| Q8_0 | 34 = d + 32 int8 | 32 | d · q |
| Q4_K | 144 = d + dmin (f16) + 12 scale bytes + 128 | 256 | per 32: d · sc · q − dmin · m (6-bit sc, m) |
| Q6_K | 210 = 128 low + 64 high + 16 int8 scales + d | 256 | per 16: d · scale · (q − 32), q 6-bit |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

Dequantize = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """One ggml block type: its name, values and bytes per block, and its dequantization."""

    name: str
    block_size: int
    type_size: int
    dequantize: Dequantize


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes start, start + 1 of each block, as float32 (blocks × 1). Every block size is even,
    so the whole array reads as fp16 pairs without a copy."""
    return blocks.view(torch.float16)[:, start // 2 : start // 2 + 1].float()


def _nibble_table(offset: int) -> torch.Tensor:
    """Byte value → its (low, high) nibble minus `offset`, as float32 (256 × 2)."""
    codes = torch.arange(256)
    return (torch.stack([codes & 0x0F, codes >> 4], dim=1) - offset).float()


NIBBLES = {0: _nibble_table(0), 8: _nibble_table(8)}


def _scaled_nibbles(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | int, shift: int) -> torch.Tensor:
    """scale · (nibble − shift) + offset for bytes (blocks × k) holding 2k values, the k low nibbles first:
    one table lookup gives both nibbles of each byte as floats, one fused multiply-add writes the result."""
    count = packed.shape[0]
    pairs = F.embedding(packed.int(), NIBBLES[shift].to(packed.device))  # blocks × k × (low, high)
    result = torch.empty(count, 2, packed.shape[1], device=packed.device)
    if isinstance(offset, int):
        return torch.mul(pairs.transpose(1, 2), scale.unsqueeze(2), out=result).view(count, -1)
    return torch.addcmul(offset.unsqueeze(2), scale.unsqueeze(2), pairs.transpose(1, 2), out=result).view(count, -1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (blocks × k) to 2k 4-bit values: the k low nibbles, then the k high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _fifth_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 high bits of Q5 blocks (a little-endian uint32 at `start`), as 0/16 per value (blocks × 32)."""
    high = blocks[:, start : start + 4].long()
    word = high[:, 0] | (high[:, 1] << 8) | (high[:, 2] << 16) | (high[:, 3] << 24)
    return ((word.unsqueeze(1) >> torch.arange(32, device=blocks.device)) & 1) * 16


def q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled_nibbles(blocks[:, 2:], _half(blocks, 0), 0, shift=8)


def q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled_nibbles(blocks[:, 4:], _half(blocks, 0), _half(blocks, 2), shift=0)


def q5_0(blocks: torch.Tensor) -> torch.Tensor:
    values = _nibbles(blocks[:, 6:]).long() | _fifth_bits(blocks, 2)
    return _half(blocks, 0) * (values.float() - 16)


def q5_1(blocks: torch.Tensor) -> torch.Tensor:
    values = _nibbles(blocks[:, 8:]).long() | _fifth_bits(blocks, 4)
    return _half(blocks, 0) * values.float() + _half(blocks, 2)


def q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.int8)[:, 2:].float().mul_(_half(blocks, 0))


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 scale bytes to 8 six-bit scales and 8 six-bit mins: bytes 0-3 hold scales 0-3 (low 6
    bits) and the top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    scale_bytes, min_bytes, low_bytes = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([scale_bytes & 0x3F, (low_bytes & 0x0F) | ((scale_bytes >> 2) & 0x30)], dim=1)
    mins = torch.cat([min_bytes & 0x3F, (low_bytes >> 4) | ((min_bytes >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    count = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    packed = blocks[:, 16:].reshape(count, 4, 1, 32)  # 4 chunks of 32 bytes: sub-blocks 2c (low), 2c+1 (high)
    values = torch.cat([packed & 0x0F, packed >> 4], dim=2).reshape(count, 8, 32).float()
    scale = (_half(blocks, 0) * scales).unsqueeze(2)
    offset = (_half(blocks, 2) * mins).unsqueeze(2)
    return (scale * values - offset).reshape(count, 256)


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    count = blocks.shape[0]
    low = blocks[:, :128].reshape(count, 2, 1, 64)  # per half of 128 values: 64 bytes of low nibbles
    low = torch.cat([low & 0x0F, low >> 4], dim=2).reshape(count, 8, 32)
    high = blocks[:, 128:192].reshape(count, 2, 1, 32)  # per half: 32 bytes of four 2-bit high parts
    high = torch.cat([(high >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=2).reshape(count, 8, 32)
    values = ((low | (high << 4)).float() - 32).reshape(count, 16, 16)
    scales = blocks.view(torch.int8)[:, 192:208].float()
    scale = (_half(blocks, 208) * scales).unsqueeze(2)
    return (scale * values).reshape(count, 256)


BLOCK_FORMATS: dict[int, BlockFormat] = {
    2: BlockFormat("Q4_0", 32, 18, q4_0),
    3: BlockFormat("Q4_1", 32, 20, q4_1),
    6: BlockFormat("Q5_0", 32, 22, q5_0),
    7: BlockFormat("Q5_1", 32, 24, q5_1),
    8: BlockFormat("Q8_0", 32, 34, q8_0),
    12: BlockFormat("Q4_K", 256, 144, q4_k),
    14: BlockFormat("Q6_K", 256, 210, q6_k),
}
"""The block types deltatune keeps quantized, keyed by their ggml type number (`gguf.GGMLQuantizationType`)."""


def block_format(ggml_type: int) -> BlockFormat:
    return BLOCK_FORMATS[int(ggml_type)]


def dequantize_rows(rows: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Rows of whole blocks (uint8, ... × bytes per row) as float32 (... × values per row)."""
    layout = block_format(ggml_type)
    blocks = rows.reshape(-1, layout.type_size)
    values = layout.dequantize(blocks)
    return values.reshape(*rows.shape[:-1], rows.shape[-1] // layout.type_size * layout.block_size)
