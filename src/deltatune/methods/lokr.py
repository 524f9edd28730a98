"""LoKr: a Kronecker product update (LyCORIS, Yeh et al. 2024, arXiv:2309.14859; KronA, Edalati et al.
2022, arXiv:2212.10650), as peft 0.21's `LoKrConfig` computes it.

    ΔW = s · W1 ⊗ W2        W1: out_l × in_m    W2: out_k × in_n (× kernel)    s = alpha / r
                            out = out_l · out_k,  in = in_m · in_n  (`kronecker_factors`)

Each dimension splits into two factors near its square root (or `decompose_factor` and the rest). W2
is a rank-r product W2a W2b unless r ≥ max(out_k, in_n) / 2 (then it is a full `lokr_w2`); W1 is full
unless `decompose_both` and r < max(out_l, in_m) / 2 (then W1a W1b). On a convolution W2 carries the
kernel: full (out_k × in_n × kernel), or W2a W2b with W2b r × (in_n · kernel), or with
`use_effective_conv2d` (kernels larger than 1) a core T2 (r × r × kernel, a Conv1d's padded with a
trailing 1) times W2a, W2b (both r × features). The product is torch's `kron` of the two tensors as peft
forms them (a 4-d W2 against W1 with two trailing unit dims), reshaped to the layer's weight. (A Conv1d's
full 3-d W2 meets a 2-d W1 that `kron` pads in front: its ΔW holds the same products w1·w2 in another
order than the 4-d case. We follow peft there, so its folders load with its outputs.)

Init (peft's): `init_weights=True`: W1 (or W1a) zero, the rest Kaiming-uniform, so ΔW = 0 at start;
`"lycoris"`: LyCORIS's own, W2 (or W2b) zero instead; False: all random. Tensors `lokr_w1`, `lokr_w1_a`,
`lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`, `lokr_t2`, with peft's names and shapes.

The forward on linear layers (`factored`) never makes ΔW: with x viewed as an in_m × in_n matrix X, (W1 ⊗
W2) x = vec(W1 X W2ᵀ): one matmul by W2ᵀ over all tokens at once, then one by W1, about out_k · (in + out_l
· in_m) multiplications per token instead of in · out (SmolLM2's 576 × 576 q_proj: 24 · 1,152 against
331,776), and no out × in matrix nor its gradient at each step. Used where it costs less than in · out:
everywhere but where out_l = 1 (a prime output dimension) and on some tiny layers. Measured (noisy: 2 shared
CPU cores under load 7-11; quick local runs, bench/ has the benchmark): one adapted layer's forward +
backward over 1,024 tokens, the adapter's part of the time is 0.20-0.56 of peft's on SmolLM2's four shapes;
a whole training step of a 4-layer model of SmolLM2's widths (batch 4 × 256, r = 8, one thread, steps
alternating), 0.65 of peft's for all-linear (0.99 with ΔW made instead) and 0.94 for q_proj, v_proj.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaTuneError
from ..peft_keys import LOKR_READ
from ..registry import register
from .lycoris import LAYER_SHAPES, LycorisAdapter, LycorisConfig, LycorisMethod, LycorisPeft, kaiming


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    """LoKr settings; names and defaults follow peft's `LoKrConfig`."""

    init_weights: bool | Literal["lycoris"] = True
    """True: W1 starts at zero (the model starts equal to the base); "lycoris": W2 starts at zero
    instead; False: every factor random."""
    decompose_both: bool = False
    """Also make W1 a rank-r product W1a W1b (where r < max(out_l, in_m) / 2)."""
    decompose_factor: int = -1
    """-1: split each dimension into factors near its square root; n ≥ 1: into n and the rest where n
    divides it, else the split closest to the root whose smaller factor is at most n."""
    rank_dropout_scale: bool = False
    """Rescale the features that rank dropout keeps by 1 / (the kept fraction)."""

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise DeltaTuneError(f"decompose_factor must be -1 or a whole number ≥ 1, got {self.decompose_factor}")


def kronecker_factors(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (and LyCORIS's) split of `dimension` into m · n: (factor, dimension / factor) where factor
    divides it; otherwise, walking up the divisors m of `dimension` while m < dimension / m and m ≤ the
    limit (`factor`, or no limit for -1), the last pair, smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    smaller, larger = 1, dimension
    while smaller < larger:
        divisor = next(d for d in range(smaller + 1, dimension + 1) if dimension % d == 0)
        if divisor > limit:
            break
        smaller, larger = divisor, dimension // divisor
    return min(smaller, larger), max(smaller, larger)


def kronecker(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`torch.kron(left, right)` (`left` padded in front with unit dims up to `right`'s), as one broadcast
    product: out[i·R + j] = left[i] · right[j] along every dim. (torch 2's `kron` fails on the core form's
    einsum output for a Conv1d, whose unit kernel dim has a stride other than 1: peft 0.21 cannot run
    LoKr with `use_effective_conv2d` on a Conv1d; here it runs.)"""
    left = left.reshape((1,) * (right.dim() - left.dim()) + tuple(left.shape))
    spread_left = left.reshape([size for dim in left.shape for size in (dim, 1)])
    spread_right = right.reshape([size for dim in right.shape for size in (1, dim)])
    return (spread_left * spread_right).reshape([a * b for a, b in zip(left.shape, right.shape, strict=True)])


class LoKrAdapter(LycorisAdapter):
    """LoKr at one Linear, Conv1D, Conv1d or Conv2d layer."""

    tensor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, module: nn.Module, module_name: str, config: LoKrConfig) -> None:
        super().__init__(module, module_name, config)
        self.rescales_rank_dropout = config.rank_dropout_scale
        shape, rank = self.shape, self.rank
        self.out_l, self.out_k = kronecker_factors(shape.out_features, config.decompose_factor)
        self.in_m, self.in_n = kronecker_factors(shape.in_features, config.decompose_factor)
        if config.decompose_both and rank < max(self.out_l, self.in_m) / 2:
            self.new_factor("lokr_w1_a", self.out_l, rank)
            self.new_factor("lokr_w1_b", rank, self.in_m)
        else:
            self.new_factor("lokr_w1", self.out_l, self.in_m)
        self.core_form = False
        if rank >= max(self.out_k, self.in_n) / 2:
            self.new_factor("lokr_w2", self.out_k, self.in_n, *shape.kernel_size)
        elif config.use_effective_conv2d and shape.has_kernel:
            self.core_form = True
            self.new_factor("lokr_t2", rank, rank, *(*shape.kernel_size, 1)[:2])
            self.new_factor("lokr_w2_a", rank, self.out_k)
            self.new_factor("lokr_w2_b", rank, self.in_n)
        else:
            self.new_factor("lokr_w2_a", self.out_k, rank)
            self.new_factor("lokr_w2_b", rank, self.in_n * math.prod(shape.kernel_size))
        per_token = self.out_k * (shape.in_features + self.out_l * self.in_m)
        self.factored = not shape.kernel_size and per_token < shape.in_features * shape.out_features
        self.reset(config.init_weights)

    def reset(self, init: bool | str) -> None:
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init]
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name in zero:
                    nn.init.zeros_(parameter)
                else:
                    kaiming(parameter)

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if "lokr_w1" in self._parameters else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        if "lokr_w2" in self._parameters:
            return self.lokr_w2
        if self.core_form:
            return torch.einsum("abkl,ao,bc->ockl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (kronecker(w1, w2) * self.scaling).reshape(self.shape.weight_shape)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor:
        """vec(W1 X W2ᵀ) per token as two plain matrix products over all tokens (each the same kernel
        whether or not the factors need gradients, so results do not depend on it)."""
        tokens = x.numel() // self.shape.in_features
        half = F.linear(x.reshape(tokens * self.in_m, self.in_n), self._w2())  # rows of X times W2ᵀ
        half = half.view(tokens, self.in_m, self.out_k).transpose(1, 2).reshape(tokens * self.out_k, self.in_m)
        out = F.linear(half, self._w1() * self.scaling)  # (token, q) rows times W1ᵀ: Y[q, p] = (W1 X W2ᵀ)[p, q]
        return out.view(tokens, self.out_k, self.out_l).transpose(1, 2).reshape(*x.shape[:-1], -1)


class LoKrPeft(LycorisPeft):
    """LoKr in peft's files (peft type `LOKR`)."""

    peft_type = "LOKR"
    adapter_class = LoKrAdapter
    config_class = LoKrConfig
    math_fields = (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "init_weights",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
    )
    read_keys = LOKR_READ


@register("lokr")
class LoKr(LycorisMethod):
    """LoKr on the selected Linear, Conv1D, Conv1d and Conv2d layers."""

    config_class = LoKrConfig
    adapter_types = dict.fromkeys(LAYER_SHAPES, LoKrAdapter)
    peft_codec = LoKrPeft()
