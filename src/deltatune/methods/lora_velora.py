"""VeLoRA: LoRA whose backward pass keeps a rank-1 projection of A's input (Miles et al. 2024,
"VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections", arXiv:2405.17991; peft's
`velora_config`).

The forward pass is LoRA's: h = x Aᵀ. Plain autograd keeps x (T tokens × in features) to compute
∂A = gᵀ x. VeLoRA splits each token into G sub-tokens of D = ⌈in / G⌉ features (x zero-padded to G·D),
projects each on one unit vector v ∈ R^D and keeps only the coefficients c[t, g] = ⟨x[t, g], v⟩
(T × G, a factor D smaller than x). Backward rebuilds x̂[t, g] = scale · c[t, g] · v, so

    ∂A ≈ gᵀ x̂,   ∂A[r, (g, d)] = scale · (Σ_t g[t, r] c[t, g]) · v[d]   (truncated to the in features)

computed here as the (rank × G) product gᵀ c times v, never as the T × in matrix x̂ (peft builds x̂);
∂x = g A is exact, and B's gradient is LoRA's. v (`init_type`): "random", a normalised Gaussian drawn
once; "batch_average", the normalised mean of the sub-tokens of each training batch (recomputed every
training forward); "batch_average_once", that mean for the first training batch, then kept. v is a
buffer saved with the adapter (peft's `lora_velora_embed`). A loaded "batch_average_once" vector is kept
(peft's in-memory flag is lost on load, so peft recomputes it from the next batch): a resumed run then
continues bit-exactly. With dropout, x is dropped first (`F.dropout`, whose mask autograd keeps: one
byte per element) and v is taken from the dropped x, as in peft. Outside training, or without autograd,
the projection is plain LoRA's. Layers: `nn.Linear`, GPT-2's `Conv1D` and the quantized linears (peft:
`nn.Linear` and `Conv1D`).

Measured (`bench/saved_tensors.py --quantize none --dropout 0 --velora-groups 64`: SmolLM2-135M, float32,
batch 8 × 64, r = 16 on all seven linears): a training forward keeps 462 MiB for backward instead of
plain LoRA's 593 MiB (peft: 557 and 688); the rest is what the model's own operations keep.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..field_check import PositiveFloat, PositiveInt, check_fields
from .lora_data_init import settings_from_dict


@dataclasses.dataclass
class VeloraConfig:
    """VeLoRA's settings; names and defaults follow peft's `VeloraConfig`."""

    num_groups: PositiveInt = 64
    """G: sub-tokens per token. More groups keep more of x (T × G numbers) and approximate ∂A better."""
    scale: PositiveFloat = 1.0
    """Factor on the rebuilt input x̂ in the backward pass (∂A scales with it)."""
    init_type: Literal["batch_average", "batch_average_once", "random"] = "batch_average"
    """How the projection vector v is set: from every training batch, from the first one only, or at random."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VeloraConfig:
        return settings_from_dict(cls, data, "velora_config", "peft's VeloraConfig fields")

    def __post_init__(self) -> None:
        check_fields(self)


def velora_config_for_peft(config: Any) -> dict[str, Any] | None:
    """The `velora_config` of peft's adapter_config.json for LoraConfig `config`."""
    return None if config.velora_config is None else dataclasses.asdict(config.velora_config)


def check_velora_options(config: Any) -> None:
    """Refuse VeLoRA beside the LoRA options it does not combine with (peft refuses them too)."""
    if config.velora_config is None:
        return
    if config.use_dora:
        raise DeltaTuneError("velora_config and use_dora do not combine (as in peft): choose one of them")
    if config.target_parameters:
        raise DeltaTuneError(
            "velora_config applies to layers (target_modules), not to target_parameters: drop one of the two"
        )


def add_velora(adapter: nn.Module, module: nn.Module, module_name: str, config: Any) -> None:
    """Give a LoRA linear adapter its VeLoRA projection, when `config` asks for one."""
    from .lora import LoraLinear  # lora builds on this module's config

    if config.velora_config is None:
        return
    if not isinstance(adapter, LoraLinear):
        raise UnsupportedModuleError(
            f"VeLoRA compresses the inputs of linear layers only, not of {module_name} ({type(module).__name__}): "
            "leave it out of target_modules (or list it in exclude_modules), or drop velora_config"
        )
    adapter.velora = VeloraProjection(adapter.lora_A.shape[1], config.velora_config, adapter.lora_A)


def group_width(in_features: int, num_groups: int) -> int:
    """D = ⌈in / G⌉, the features of one sub-token."""
    return math.ceil(in_features / num_groups)


def sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x (…, in) as (T, G, D) sub-tokens, zero-padded to G·D features (a view when no padding is needed)."""
    width = group_width(x.shape[-1], num_groups)
    padding = num_groups * width - x.shape[-1]
    if padding:
        x = F.pad(x, (0, padding))
    return x.reshape(-1, num_groups, width)


def unit_vector(vector: torch.Tensor) -> torch.Tensor:
    """vector / ‖vector‖ in float32; the zero vector becomes the normalised ones vector (as peft). Chosen on
    the device, with no host synchronisation (a "batch_average" adapter computes it every training call)."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    ones = torch.full_like(vector, 1 / math.sqrt(vector.numel()))
    return torch.where(norm > 0, vector / norm.clamp_min(torch.finfo(torch.float32).tiny), ones)


class VeloraProjection(nn.Module):
    """One adapter's VeLoRA state: the projection vector v (buffer `projection`, D entries) and its settings."""

    def __init__(self, in_features: int, settings: VeloraConfig, reference: torch.Tensor) -> None:
        super().__init__()
        self.num_groups = settings.num_groups
        self.scale = settings.scale
        self.init_type = settings.init_type
        width = group_width(in_features, settings.num_groups)
        factory = {"dtype": reference.dtype, "device": reference.device}
        if settings.init_type == "random":
            self.register_buffer("projection", unit_vector(torch.randn(width, device=reference.device)).to(**factory))
        else:
            self.register_buffer("projection", torch.zeros(width, **factory))
        self.initialised: bool | None = {"random": True, "batch_average": False, "batch_average_once": None}[
            settings.init_type
        ]
        """Whether v is set for good: always for "random", never for "batch_average"; None until a
        "batch_average_once" adapter's first training call looks (a vector loaded from a file is not zero)."""

    def forward(self, x: torch.Tensor, down: torch.Tensor, dropout_probability: float) -> torch.Tensor:
        """dropout(x) downᵀ, recording a backward that keeps only the sub-token coefficients."""
        if dropout_probability > 0:
            x = F.dropout(x, dropout_probability, training=True)
        if self.initialised is None:
            self.initialised = bool(self.projection.any())
        if not self.initialised:
            self.set_from_batch(x)
        return CompressedProjection.apply(x, down, self.projection, self.num_groups, self.scale)

    @torch.no_grad()
    def set_from_batch(self, x: torch.Tensor) -> None:
        """v = the normalised mean of this batch's sub-tokens (padding features included, as peft)."""
        mean = sub_tokens(x.detach(), self.num_groups).mean(dim=(0, 1))
        self.projection = unit_vector(mean).to(self.projection.dtype)
        if self.init_type == "batch_average_once":
            self.initialised = True

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, scale={self.scale:g}, init_type={self.init_type}"


class CompressedProjection(torch.autograd.Function):
    """h = x Aᵀ; backward keeps c = (sub-tokens of x) · v (T × G) instead of x (module docstring)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_A: torch.Tensor, projection: torch.Tensor, num_groups: int, scale: float
    ) -> torch.Tensor:
        vector = projection.to(x.dtype)
        ctx.save_for_backward(sub_tokens(x, num_groups) @ vector, lora_A, vector)
        ctx.x_shape = x.shape
        ctx.scale = scale
        return F.linear(x, lora_A)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        coefficients, lora_A, vector = ctx.saved_tensors
        grad_flat = grad_hidden.reshape(-1, grad_hidden.shape[-1])
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_flat @ lora_A.to(grad_flat.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            per_group = grad_flat.t() @ coefficients.to(grad_flat.dtype)  # rank × G
            rebuilt = (per_group.unsqueeze(-1) * vector.to(grad_flat.dtype)).flatten(1)  # rank × G·D
            grad_A = (rebuilt[:, : ctx.x_shape[-1]] * ctx.scale).to(lora_A.dtype)
        return grad_x, grad_A, None, None, None
