"""LoRA initialisations from the base weight: PiSSA, OLoRA and orthogonal (peft's `init_lora_weights`);
the residual adapter CorDA shares (its factors come from data: `lora_corda`).

PiSSA (Meng et al. 2024, arXiv:2404.02948): W = U Σ Vᵀ; the r largest singular triplets start the
adapter, B₀ = U_r √(Σ_r/s), A₀ = √(Σ_r/s) V_rᵀ, so that s B₀A₀ = U_r Σ_r V_rᵀ, the best rank-r part of W.
"pissa_niter_K" takes them from torch's randomized `svd_lowrank` with K subspace iterations (faster,
but a draw: another run gives other factors).
OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R (QR decomposition); B₀ = Q_r (orthonormal
columns), A₀ = R_r (the first r rows of R).
Both are base-rewriting in peft: it replaces W by the residual W_res = W − s B₀A₀, so that the model
starts equal to the base, and trains A, B from A₀, B₀. Random draws replay peft's
(`draw_as_peft_builds_layer`): the same seed gives peft's "pissa_niter_K" factors.

deltatune never rewrites the base. The adapter (`LoraResidualLinear`) keeps the initial factors as
frozen buffers and computes

    y = W x + s·B A dropout(x) − s·B₀A₀ x  =  W_res x + s·B A dropout(x)   (peft's output, to rounding),

that is, exactly the plain LoRA of rank 2r with A' = [A; A₀], B' = [B, −B₀] that peft's conversion
(`path_initial_model_for_weight_conversion`) writes. The frozen term sees x without dropout, as W_res
does in peft. Cost: the buffers A₀, B₀ (r·(in + out) numbers per layer, as many as the trained factors;
no gradients or optimizer moments), one more rank-r product in the forward and in the input's gradient.
Keeping W_res instead would cost a whole weight matrix per layer. On a half-precision base peft rounds
W_res to the base's dtype; here the residual term stays in the adapter's float32 (so the outputs differ
from peft's by that rounding, and are closer to the unrounded math).

Saved (either format), unconverted: the trained A, B with the init's name (and, in our format, for
the randomized "pissa_niter_K", A₀ and B₀ too: they cannot be recomputed). Loaded on the original base,
A₀ and B₀ of "pissa" (full SVD) and "olora" (QR) are recomputed from W, here as in peft (which rewrites
the base it is given into W_res when it loads such a folder: give it the original base): both are
deterministic, and B₀A₀, which is all the outputs use, does not depend on the signs a decomposition
picks. peft would redraw "pissa_niter_K", so that one is written for peft only converted. Converted:
`deltatune.to_plain_lora` (`lora_convert`) adds the rank-2r plain LoRA, which saves and loads as any.

Orthogonal (peft's "orthogonal"; the blog post its code cites, datta0.github.io/posts/rethink-lora-init):
Q, an orthogonal r×r matrix from the QR of a Gaussian draw; A = (G_A Q_odd)ᵀ/10, B = G_B Q_even/10 with
Gaussian G_A (in × r/2), G_B (out × r/2) and Q_odd, Q_even the odd and even rows of Q. Q_even Q_oddᵀ = 0,
so B A = 0 (to rounding) with neither factor zero, and the base stays as it is. The draws replay
peft's (its two layer constructions, then these three), so the same seed gives peft's factors.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import DeltaTuneError, UnsupportedModuleError
from .lora import LoraAdapter, LoraConfig, LoraLinear
from .lora_mica import build_mica

PISSA_ITERATIONS = r"pissa_niter_(\d+)"
"""The randomized PiSSA's name: "pissa_niter_4" runs `svd_lowrank` with 4 subspace iterations."""


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of PiSSA for the float32 (out, in) matrix `weight`: s B₀A₀ = U_r Σ_r V_rᵀ."""
    iterations = re.fullmatch(PISSA_ITERATIONS, init)
    if iterations is None:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, values, right_t = left[:, :rank], values[:rank], right_t[:rank]
    else:
        left, values, right = torch.svd_lowrank(weight, q=rank, niter=int(iterations.group(1)))
        right_t = right.t()
    root = torch.sqrt(values / scaling)
    return root[:, None] * right_t, left * root


def olora_factors(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of OLoRA for the float32 (out, in) matrix `weight`: B₀ = Q_r, A₀ = R_r of W = Q R."""
    orthonormal, triangular = torch.linalg.qr(weight)
    return triangular[:rank], orthonormal[:, :rank]


def data_placeholder(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero factors (the model equals the base) until data sets them: CorDA (`lora_corda`)."""
    return weight.new_zeros(rank, weight.shape[1]), weight.new_zeros(weight.shape[0], rank)


INITIAL_FACTORS = {"pissa": pissa_factors, "olora": olora_factors, "corda": data_placeholder}
"""Family of a base-rewriting init → its (A₀, B₀) from the layer's weight."""

FAMILY_LAYERS = {
    "pissa": (nn.Linear, Conv1D),
    "olora": (nn.Linear,),
    "orthogonal": (nn.Linear, Conv1D),
    "eva": (nn.Linear, Conv1D),
    "corda": (nn.Linear, Conv1D),
    "mica": (nn.Linear, Conv1D, nn.Embedding),
}
"""The layers each init runs on in peft (Linear only: peft's OLoRA takes the QR of the stored weight,
which fails on GPT-2's transposed Conv1D)."""


def family_of(init: str) -> str:
    return "pissa" if init.startswith("pissa") else init


def keeps_initial_factors(init: str) -> bool:
    """Whether A₀, B₀ are saved: they cannot be recomputed from the base (a random draw, or data)."""
    return re.fullmatch(PISSA_ITERATIONS, init) is not None or init == "corda"


def draw_as_peft_builds_layer(rank: int, in_features: int, out_features: int) -> None:
    """The global generator's draws of peft's two layer constructions, nn.Linear(in, r) and nn.Linear(r,
    out), made before it runs an init: the same seed then gives peft's random factors (orthogonal,
    "pissa_niter_K") and leaves the generator where peft leaves it."""
    for shape in ((rank, in_features), (out_features, rank)):
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


class LoraResidualLinear(LoraLinear):
    """LoRA started from the base weight's decomposition (PiSSA, OLoRA), with the frozen initial term
    s B₀A₀ subtracted in the forward instead of from the weight (see the module docstring)."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        super().__init__(module, module_name, config)
        init = str(config.init_lora_weights)
        weight = module.weight.detach().float()
        matrix = weight.t() if self.transposed else weight
        if self.rank > min(matrix.shape):
            raise DeltaTuneError(
                f"{init} needs a rank of at most min(out, in) = {min(matrix.shape)} at {module_name}, got "
                f"r={self.rank}; lower r (or its rank_pattern entry)"
            )
        draw_as_peft_builds_layer(self.rank, matrix.shape[1], matrix.shape[0])
        lora_A, lora_B = INITIAL_FACTORS[family_of(init)](matrix, self.rank, self.scaling, init)
        saved = keeps_initial_factors(init)
        self.register_buffer("lora_A0", torch.empty_like(self.lora_A), persistent=saved)
        self.register_buffer("lora_B0", torch.empty_like(self.lora_B), persistent=saved)
        self.set_initial(lora_A, lora_B)

    @torch.no_grad()
    def set_initial(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Start A, B (and the frozen A₀, B₀) at these factors."""
        for parameter, initial, value in ((self.lora_A, self.lora_A0, lora_A), (self.lora_B, self.lora_B0, lora_B)):
            parameter.copy_(value)
            initial.copy_(parameter)

    def reset(self, init: bool | str) -> None:
        """Nothing: the factors come from the weight, once the shapes are known."""

    def initial_projection(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.lora_A0.dtype), self.lora_A0)

    def initial_scale(self) -> float:
        """The frozen term's factor: s (it is s B₀A₀)."""
        return self.scaling

    def low_rank_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """s·B A dropout(x) − s₀·B₀A₀ x (s₀: `initial_scale`) as one product of rank 2r, [dropout(x) Aᵀ, x A₀ᵀ]
        [s_d B, −s₀ B₀]ᵀ (s_d: the scaling dropout leaves), so the two terms, which nearly cancel at the start,
        meet inside one matmul and the output is rounded once (a bfloat16 model's output would round each)."""
        hidden, up, scaling = super().low_rank_terms(x)
        both = torch.cat([hidden, self.initial_projection(x).to(hidden.dtype)], dim=-1)
        return both, torch.cat([up * scaling, self.lora_B0.to(up.dtype) * -self.initial_scale()], dim=1), 1.0

    def delta_matrix(self) -> torch.Tensor:
        """s · (B A − B₀ A₀): the change from W (peft's W_res + s B A − W)."""
        initial = torch.mm(self.lora_B0.float(), self.lora_A0.float()).mul_(self.initial_scale())
        return super().delta_matrix().sub_(initial)


class LoraOrthogonalLinear(LoraLinear):
    """LoRA with peft's "orthogonal" start: B A = 0 with both factors non-zero (module docstring)."""

    def reset(self, init: bool | str) -> None:
        if self.rank % 2:
            raise DeltaTuneError(
                f"init_lora_weights='orthogonal' needs an even rank, got r={self.rank}; use an even r (and "
                "rank_pattern values)"
            )
        out_features, in_features = self.lora_B.shape[0], self.lora_A.shape[1]
        draw_as_peft_builds_layer(self.rank, in_features, out_features)
        rotation, _ = torch.linalg.qr(torch.randn(self.rank, self.rank))
        lora_A = torch.randn(in_features, self.rank // 2).mm(rotation[0::2]).t() / 10.0
        lora_B = torch.randn(self.rank // 2, out_features).t().mm(rotation[1::2]) / 10.0
        with torch.no_grad():
            self.lora_A.copy_(lora_A)
            self.lora_B.copy_(lora_B)


FAMILY_ADAPTERS = {
    "pissa": LoraResidualLinear,
    "olora": LoraResidualLinear,
    "corda": LoraResidualLinear,
    "orthogonal": LoraOrthogonalLinear,
    "mica": build_mica,
}


def build_initialised(module: nn.Module, module_name: str, config: LoraConfig) -> LoraAdapter:
    """The adapter for an init that reads the layer (`config.init_lora_weights` a string other than
    "gaussian"), on the layers peft runs it on."""
    family = family_of(str(config.init_lora_weights))
    if config.use_dora:
        raise DeltaTuneError(
            f"init_lora_weights={config.init_lora_weights!r} with use_dora is not implemented; use one of them"
        )
    if type(module) not in FAMILY_LAYERS[family]:
        names = " and ".join(layer.__name__ for layer in FAMILY_LAYERS[family])
        raise UnsupportedModuleError(
            f"init_lora_weights={config.init_lora_weights!r} runs on {names} layers, and {module_name} is a "
            f"{type(module).__name__}; leave it out of target_modules or use init_lora_weights=True"
        )
    return FAMILY_ADAPTERS[family](module, module_name, config)
