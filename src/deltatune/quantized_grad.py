"""The input gradient of a frozen quantized linear layer, with only its quantized storage kept for backward.

torchao's int8 weight-only tensors and optimum-quanto's `QLinear` compute y = x Wᵀ + b through their own
autograd, which saves the dequantized float W of every layer from the forward to the backward: the whole
base in float32 again, held through a training step. At an adapted layer of such a type (its table row's
`saves_dequantized`), the site runs the library's own layer on the input detached, so the library's
autograd records nothing of x (its output and a trainable bias's gradient are its own, unchanged), and
joins the output back to x through `DequantizedInputGradient`: identity on the output forward, and
∂L/∂x = ∂L/∂y · W in backward, with W dequantized again by the table (`QuantizedLinear.dequantize`) and
dropped. What the graph keeps of the layer is the layer itself (its quantized storage)."""

from __future__ import annotations

import torch
from torch import nn


class DequantizedInputGradient(torch.autograd.Function):
    """(y, x) ↦ y; backward: ∂L/∂y to y as is, ∂L/∂y · W to x, W dequantized from `module` again."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, inputs: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return grad, None, None
        from .quantized import quantized_linear  # it imports methods.base, which imports the site (and this)

        weight = quantized_linear(ctx.module).dequantize(ctx.module).to(grad.dtype)
        return grad, grad @ weight, None


def backward_by_dequantizing(module: nn.Module) -> bool:
    """Whether `module` is a quantized layer whose library saves its dequantized weight for backward."""
    from .quantized import quantized_linear

    row = quantized_linear(module)
    return row is not None and row.saves_dequantized


def detached_input(args: tuple) -> torch.Tensor | None:
    """The first positional input where it needs a gradient (and one is being recorded), else None."""
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.requires_grad and torch.is_grad_enabled():
        return first
    return None


def rejoin(output: torch.Tensor, inputs: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`output` (computed from `inputs` detached) with the input gradient through `module` restored."""
    return DequantizedInputGradient.apply(output, inputs, module)
