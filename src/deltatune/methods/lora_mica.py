"""MiCA, minor component adaptation (arXiv:2604.01694, peft's init_lora_weights="mica").

B starts at the r left singular vectors of W with the smallest singular values, W = U Σ Vᵀ, and stays
frozen; A starts at zero and is the only trained factor:

    B = U_{:, k−r:} (out × r, k = min(out, in)),   A₀ = 0,   y = W x + s·B A dropout(x),   ΔW = s·B A.

The update so lives in the directions W uses least, and the model starts equal to the base. B is a
buffer (saved, under peft's name, but never trained or handed to an optimizer). Layers as in peft:
`nn.Linear`, GPT-2's `Conv1D` (read as out × in) and `nn.Embedding` (read as embedding_dim ×
num_embeddings, peft's layout, so B is embedding_dim × r).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaTuneError
from .lora import LoraAdapter, LoraConfig, LoraEmbedding, LoraLinear


def minor_directions(matrix: torch.Tensor, rank: int, module_name: str) -> torch.Tensor:
    """U's last r columns for the (out, in) `matrix`, computed in float32."""
    if rank > min(matrix.shape):
        raise DeltaTuneError(
            f"init_lora_weights='mica' needs r ≤ min(out, in) = {min(matrix.shape)} at {module_name}, got r={rank}; "
            "lower r (or its rank_pattern entry)"
        )
    left, _, _ = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    return left[:, -rank:].contiguous()


def start_mica(adapter: LoraAdapter, matrix: torch.Tensor, module_name: str) -> None:
    """A = 0 (trained), B = the minor directions of `matrix` as a frozen buffer named `lora_B`."""
    frozen = minor_directions(matrix, adapter.rank, module_name).to(adapter.lora_B.dtype)
    del adapter.lora_B
    adapter.register_buffer("lora_B", frozen)
    with torch.no_grad():
        adapter.lora_A.zero_()


class MicaLinear(LoraLinear):
    """MiCA on `nn.Linear` and `Conv1D`."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        super().__init__(module, module_name, config)
        weight = module.weight
        start_mica(self, weight.t() if self.transposed else weight, module_name)

    def reset(self, init: bool | str) -> None:
        """Nothing: `start_mica` sets both factors once W is known."""


class MicaEmbedding(LoraEmbedding):
    """MiCA on `nn.Embedding`: W read as embedding_dim × num_embeddings."""

    def __init__(self, module: nn.Embedding, module_name: str, config: LoraConfig) -> None:
        super().__init__(module, module_name, config)
        start_mica(self, module.weight.t(), module_name)

    reset = MicaLinear.reset


def build_mica(module: nn.Module, module_name: str, config: LoraConfig) -> LoraAdapter:
    """MiCA's adapter for a layer `lora_init.FAMILY_LAYERS` allows."""
    return (MicaEmbedding if isinstance(module, nn.Embedding) else MicaLinear)(module, module_name, config)
