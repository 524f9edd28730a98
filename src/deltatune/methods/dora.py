"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), on LoRA's linears.

The adapted weight is split into a learned magnitude per output feature and a direction:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c        ‖·‖_c: the norm of each output row (out × in layout)

m (`lora_magnitude_vector`, one value per output feature) starts at ‖W + s·B A‖_c, so W' = W + s·B A at
first. The norm is detached (the paper's section 4.3, as peft does): it follows B A but gets no gradient.
With g = m / ‖W + s·B A‖_c the layer computes, from the base output y = W x + b,

    y' = y + (g − 1) ⊙ (W x̃) + g ⊙ s·B A x̃        x̃ = dropout(x) in training, x otherwise

so the base path keeps the undropped input and only the correction terms see the dropped one (peft's
rule). Without dropout W x̃ = y − b and nothing is recomputed: y' = g ⊙ (y − b + s·B A x) + b.

The norm never builds W + s·B A: row by row, ‖W + s·B A‖² = ‖W‖² + 2s·⟨W Aᵀ, B⟩ + s²·⟨B (A Aᵀ), B⟩,
an out × rank product and a rank × rank Gram matrix; ‖W‖² is kept while W is unchanged. In eval mode the
norm itself is kept until `train()` or until W, A or B change (their version counters).
Merging folds W' in: ΔW = g ⊙ (W + s·B A) − W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..quantized import quantized_linear
from ..site import SiteAdapter
from .base import lookup_type
from .lora import LoraConfig, LoraLinear, LoraQuantizedLinear, add_low_rank


def _versions(*tensors: torch.Tensor) -> tuple[int, ...]:
    """What identifies the values of `tensors`: their storages and in-place version counters."""
    return tuple(value for tensor in tensors for value in (tensor.data_ptr(), tensor._version))


class DoraLinear(LoraLinear):
    """DoRA on `nn.Linear` and GPT-2's `Conv1D`: LoRA's A and B plus the magnitude m."""

    delta_reads_module = True  # ΔW depends on W: unmerge subtracts the kept delta

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        super().__init__(module, module_name, config)
        self._base_square: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._eval_norm: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(module).to(self.lora_A.dtype, copy=True))

    def base_weight(self, module: nn.Module) -> torch.Tensor:
        """The base weight in out × in layout (a view), detached."""
        weight = module.weight.detach()
        return weight.t() if self.transposed else weight

    def weight_norm(self, module: nn.Module) -> torch.Tensor:
        """‖W + s·B A‖ per output row, float32, detached; kept in eval mode while W, A and B are unchanged."""
        weight = module.weight
        key = _versions(weight, self.lora_A, self.lora_B)
        if not self.training and self._eval_norm is not None and self._eval_norm[0] == key:
            return self._eval_norm[1]
        with torch.no_grad():
            base = self.base_weight(module).float()
            lora_A, lora_B = self.lora_A.detach().float(), self.lora_B.detach().float()
            cross = torch.mm(base, lora_A.t()).mul_(lora_B).sum(1)
            quadratic = torch.mm(lora_B, torch.mm(lora_A, lora_A.t())).mul_(lora_B).sum(1)
            square = self.base_square(module).add(cross, alpha=2 * self.scaling).add_(quadratic, alpha=self.scaling**2)
            norm = square.clamp_min_(0).sqrt_()
        self._eval_norm = None if self.training else (key, norm)
        return norm

    def base_square(self, module: nn.Module) -> torch.Tensor:
        """‖W‖² per output row, kept while W is unchanged (the base is frozen)."""
        key = _versions(module.weight)
        if self._base_square is None or self._base_square[0] != key:
            base = self.base_weight(module).float()
            self._base_square = (key, base.square().sum(1))
        return self._base_square[1]

    def train(self, mode: bool = True) -> DoraLinear:
        self._eval_norm = None
        return super().train(mode)

    def factor(self, module: nn.Module) -> torch.Tensor:
        """g = m / ‖W + s·B A‖ (the gradient reaches m only)."""
        return self.lora_magnitude_vector / self.weight_norm(module).to(self.lora_magnitude_vector.dtype)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        factor = self.factor(module).to(output.dtype)
        if self.training and self.dropout_probability > 0:
            dropped = F.dropout(x, self.dropout_probability, training=True)
            low_rank = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(output.dtype)
            weight = self.base_weight(module)
            base = F.linear(dropped.to(weight.dtype), weight).to(output.dtype)
            return output + (factor - 1) * base + factor * (self.scaling * low_rank)
        bias = getattr(module, "bias", None)
        hidden, scaling = self.project(x)
        unbiased = output if bias is None else output - bias.to(output.dtype)
        adapted = factor * add_low_rank(unbiased, hidden, self.lora_B, scaling)
        return adapted if bias is None else adapted + bias.to(output.dtype)

    forward_rows = SiteAdapter.forward_rows  # the rows' own base outputs: the generic slicing is exact

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = g ⊙ (W + s·B A) − W (rows scaled by g), in the module's layout."""
        base = self.base_weight(module).float()
        factor = self.factor(module).detach().float().unsqueeze(1)
        delta = torch.addmm(base, self.lora_B.detach().float(), self.lora_A.detach().float(), alpha=self.scaling)
        delta = delta.mul_(factor).sub_(base)
        return {"weight": delta.t() if self.transposed else delta}


class DoraQuantizedLinear(DoraLinear, LoraQuantizedLinear):
    """DoRA on a quantized linear (`deltatune.quantized`): the norm, and the base term under dropout, read
    the dequantized weight (made on demand, as peft does; ‖W‖² is kept while the packed weight is unchanged)."""

    def base_weight(self, module: nn.Module) -> torch.Tensor:
        row = quantized_linear(module)  # None once a dequantizing merge made the layer a plain Linear
        return super().base_weight(module) if row is None else row.dequantize(module).detach()


def _dora_types() -> dict[type | str, type[DoraLinear]]:
    from transformers.pytorch_utils import Conv1D

    return {nn.Linear: DoraLinear, Conv1D: DoraLinear}


DORA_TYPES = _dora_types()


def build_dora(module: nn.Module, module_name: str, config: LoraConfig) -> DoraLinear:
    """The DoRA adapter for one selected module; other layer types are refused."""
    if quantized_linear(module) is not None:
        return DoraQuantizedLinear(module, module_name, config)
    adapter_class = lookup_type(DORA_TYPES, type(module), None)
    if adapter_class is None:
        raise UnsupportedModuleError(
            f"use_dora is not supported on {type(module).__name__} layers ({module_name}): DoRA adapts Linear "
            "(plain or quantized) and Conv1D layers only: leave this layer out of target_modules or set use_dora=False"
        )
    return adapter_class(module, module_name, config)
