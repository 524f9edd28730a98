"""A frozen linear layer over GGUF blocks: y = x Wᵀ + b with W kept as its quantized bytes.

The layer holds `weight` as a uint8 buffer (out_features × bytes per row: each row is its blocks along
the input dimension), never a float copy. Its forward dequantizes W a chunk of rows at a time (at most
`TEMPORARY_VALUES` floats alive), multiplies, and drops the chunk; the backward does the same again for
the input gradient ∂L/∂x = ∂L/∂y · W. So no dequantized weight lives from the forward to the backward:
the autograd graph keeps only the blocks (already held by the layer). W never trains (no ∂L/∂W); adapters
train beside it. It is an `nn.Linear` so that targeting ("all-linear") and the adapters' tables see a
linear layer; its logical shape is in `in_features` / `out_features` as for a float one.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import block_format, dequantize_rows

TEMPORARY_VALUES = 1 << 22
"""The most dequantized weight values alive at once in a forward or backward (16 MiB of float32)."""


def _row_chunks(blocks: torch.Tensor, in_features: int) -> list[tuple[int, int]]:
    rows = max(1, TEMPORARY_VALUES // in_features)
    return [(start, min(start + rows, blocks.shape[0])) for start in range(0, blocks.shape[0], rows)]


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """x Wᵀ for W given by its blocks (out × bytes per row), dequantized in chunks of rows."""
    chunks = _row_chunks(blocks, in_features)
    if len(chunks) == 1:
        return x @ dequantize_rows(blocks, ggml_type).to(x.dtype).t()
    output = x.new_empty(*x.shape[:-1], blocks.shape[0])
    for start, end in chunks:
        output[..., start:end] = x @ dequantize_rows(blocks[start:end], ggml_type).to(x.dtype).t()
    return output


def block_matmul_transposed(grad: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """grad W for W given by its blocks: the input gradient of `block_matmul`."""
    result = None
    for start, end in _row_chunks(blocks, in_features):
        part = grad[..., start:end] @ dequantize_rows(blocks[start:end], ggml_type).to(grad.dtype)
        result = part if result is None else result.add_(part)
    return result


class BlockLinearFunction(torch.autograd.Function):
    """x ↦ x Wᵀ over GGUF blocks; the backward dequantizes W again for ∂L/∂x (W itself gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
        ctx.save_for_backward(blocks)
        ctx.ggml_type, ctx.in_features = ggml_type, in_features
        return block_matmul(x, blocks, ggml_type, in_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (blocks,) = ctx.saved_tensors
        return block_matmul_transposed(grad, blocks, ctx.ggml_type, ctx.in_features), None, None, None


class GGUFLinear(nn.Linear):
    """A frozen linear layer whose weight stays in GGUF blocks (`weight`: uint8, out × bytes per row)."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        layout = block_format(ggml_type)
        if in_features % layout.block_size or blocks.shape[-1] != in_features // layout.block_size * layout.type_size:
            raise ValueError(f"{tuple(blocks.shape)} bytes are not rows of {in_features} {layout.name} values")
        self.in_features, self.out_features, self.ggml_type = in_features, blocks.shape[0], int(ggml_type)
        self.register_buffer("weight", blocks)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @property
    def type_name(self) -> str:
        return block_format(self.ggml_type).name

    def dequantized_weight(self) -> torch.Tensor:
        """W as float32 (out × in), made on demand (for a merge) and never kept."""
        return dequantize_rows(self.weight, self.ggml_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = BlockLinearFunction.apply(x, self.weight, self.ggml_type, self.in_features)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name}, bias={bias}"
