"""LoHa: a low-rank Hadamard product update (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS,
Yeh et al. 2024, arXiv:2309.14859), as peft 0.21's `LoHaConfig` computes it.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b)        W1a, W2a: out × r    W1b, W2b: r × in (· kernel)    s = alpha / r

Two rank-r products multiplied elementwise give a ΔW of rank up to r² for the parameters of two rank-r
LoRAs. A convolution's ΔW is the matrix out × (in/groups · kernel) reshaped to the layer's weight; with
`use_effective_conv2d` (kernels larger than 1) each product is instead a core tensor T (r × r × kernel,
a Conv1d's kernel padded with a trailing 1 as peft does) times its two factors, now both r × features:

    ΔW_i[o, c, k] = Σ_{a,b} T_i[a, b, k] · Wia[a, o] · Wib[b, c]        ΔW = s · ΔW_1 ⊙ ΔW_2

Init (peft's): Kaiming-uniform for every factor and core, W2b zero (`init_weights=True`: ΔW = 0 at start);
`init_weights=False` draws W2b too. Tensors: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, and
`hada_t1`, `hada_t2` in the core form, with peft's names and shapes, so peft's folders load as they are.

The forward on linear layers (`factored`): with a = W1b ⊙_rows W2b (the r² rows W1b[i] ⊙ W2b[j]) and b = W1a
⊙_cols W2a (the r² columns W1a[:, i] ⊙ W2a[:, j]), ΔW = b a exactly, so s·ΔW x = s · b (a x): a rank-r² LoRA
product, r²·(in + out) multiplications per token instead of in · out for peft's `F.linear(x, ΔW)`, and no
out × in matrix (nor its gradient) made at each step. It is used where it costs less, r² (in + out) < in ·
out (SmolLM2's q_proj at r = 8: 64 · 1152 against 576²); elsewhere (and on convolutions) ΔW is made and
applied as a second weight, as peft does. Measured (noisy: 2 shared CPU cores under load 7-11; quick local
runs, bench/ has the benchmark): one adapted layer's forward + backward over 1,024 tokens, the adapter's
part of the time is 0.01-0.86 of peft's on SmolLM2's four shapes; a whole training step of a 4-layer model
of SmolLM2's widths (batch 4 × 256, r = 8, one thread, steps alternating), 0.57 of peft's for all-linear
(1.04 with ΔW made instead) and 0.89 for q_proj, v_proj.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..peft_keys import LYCORIS_READ
from ..registry import register
from .lycoris import LAYER_SHAPES, LycorisAdapter, LycorisConfig, LycorisMethod, LycorisPeft, kaiming


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    """LoHa settings; names and defaults follow peft's `LoHaConfig` (the fields are `LycorisConfig`'s)."""


class LoHaAdapter(LycorisAdapter):
    """LoHa at one Linear, Conv1D, Conv1d or Conv2d layer."""

    tensor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, module: nn.Module, module_name: str, config: LoHaConfig) -> None:
        super().__init__(module, module_name, config)
        shape, rank = self.shape, self.rank
        self.core_form = config.use_effective_conv2d and shape.has_kernel
        for product in (1, 2):
            if self.core_form:
                kernel = (*shape.kernel_size, 1)[:2]
                self.new_factor(f"hada_t{product}", rank, rank, *kernel)
                self.new_factor(f"hada_w{product}_a", rank, shape.out_features)
                self.new_factor(f"hada_w{product}_b", rank, shape.in_features)
            else:
                self.new_factor(f"hada_w{product}_a", shape.out_features, rank)
                self.new_factor(f"hada_w{product}_b", rank, shape.flat_in_features)
        features = shape.in_features + shape.out_features
        self.factored = not shape.kernel_size and rank * rank * features < shape.in_features * shape.out_features
        self.reset(config.init_weights)

    def reset(self, init: bool) -> None:
        with torch.no_grad():
            for parameter in self.parameters():
                kaiming(parameter)
            if init:
                nn.init.zeros_(self.hada_w2_b)

    def _product(self, index: int) -> torch.Tensor:
        """W_ia W_ib, or in the core form the core times both factors, as out × in (× kernel)."""
        left, right = getattr(self, f"hada_w{index}_a"), getattr(self, f"hada_w{index}_b")
        if self.core_form:
            return torch.einsum("abkl,ao,bc->ockl", getattr(self, f"hada_t{index}"), left, right)
        return left @ right

    def delta_weight(self) -> torch.Tensor:
        return (self._product(1) * self._product(2) * self.scaling).reshape(self.shape.weight_shape)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(rank * rank, -1)
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, rank * rank)
        return F.linear(F.linear(x, down), up * self.scaling)


class LoHaPeft(LycorisPeft):
    """LoHa in peft's files (peft type `LOHA`)."""

    peft_type = "LOHA"
    adapter_class = LoHaAdapter
    config_class = LoHaConfig
    math_fields = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights")
    read_keys = LYCORIS_READ


@register("loha")
class LoHa(LycorisMethod):
    """LoHa on the selected Linear, Conv1D, Conv1d and Conv2d layers."""

    config_class = LoHaConfig
    adapter_types = dict.fromkeys(LAYER_SHAPES, LoHaAdapter)
    peft_codec = LoHaPeft()
