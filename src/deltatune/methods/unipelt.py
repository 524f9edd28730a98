"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
arXiv:2110.07577), composed as AdapterHub's `UniPELTConfig` composes it: prefix tuning, a sequential
(Pfeiffer) bottleneck adapter and LoRA on the attention's query and value, each with a learned gate
(`gating`: g = mean_t σ(W_g x_t + b_g) of the part's own input), under one adapter name:

    K_l ← [g_P · P^K_l ; K_l],  V_l ← [g_P · P^V_l ; V_l]     prefix: n = 10, MLP hidden 512
    h ← h + g_A · W_up relu(W_down LN(h + x))                   adapter: size = hidden / 16
    y = W x + g_L · B A x                                       LoRA: r = 8, on q and v (the gate replaces α/r)

(GPT-2 computes q, k and v in one fused `c_attn`: its LoRA adapts the q and v thirds, `methods/lora_fused.py`.)

Data over the three methods, as MAM is over two (`methods/mam.py`): each part's own attach on one
placement. Not mergeable (the gates depend on the input); no mixed batches (the prefix's gate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import DeltaConfig
from ..placement import Placement
from ..registry import register
from .bottleneck import Bottleneck, BottleneckConfig
from .lora import Lora
from .lora_config import LoraConfig
from .mam import part_config
from .prefix_tuning import PrefixTuning, PrefixTuningConfig

PREFIX_DEFAULTS: dict[str, Any] = dict(
    num_virtual_tokens=10,
    prefix_projection=True,
    encoder_hidden_size=512,
    embedding_dim="hidden_size",
    shift_positions=False,
    encoder_prefix=True,
    cross_prefix=True,
    use_gating=True,
)
"""AdapterHub's UniPELT prefix: `PrefixTuningConfig(prefix_length=10)` (bottleneck 512), gated."""
ADAPTER_DEFAULTS: dict[str, Any] = dict(preset="pfeiffer", reduction_factor=16, use_gating=True)
"""AdapterHub's UniPELT adapter: `SeqBnConfig(reduction_factor=16)`, gated."""
LORA_DEFAULTS: dict[str, Any] = dict(r=8, lora_alpha=2, use_gating=True, fused_slices={"c_attn": [True, False, True]})
"""AdapterHub's UniPELT LoRA: `LoRAConfig(r=8, alpha=2)` on q and v (LoRA's default targets; on GPT-2 the q
and v thirds of its fused `c_attn`), gated."""


@dataclasses.dataclass
class UniPELTConfig(DeltaConfig):
    """Gated prefix tuning + a gated Pfeiffer adapter + gated LoRA. A part given as a dict changes
    AdapterHub's UniPELT defaults; a part given as a config is taken as it is."""

    prefix_tuning: PrefixTuningConfig | dict[str, Any] | None = None
    """The prefix part; None: 10 virtual tokens through an MLP of hidden size 512, gated, positions kept."""
    adapter: BottleneckConfig | dict[str, Any] | None = None
    """The adapter part; None: the "pfeiffer" preset, reduction factor 16, gated."""
    lora: LoraConfig | dict[str, Any] | None = None
    """The LoRA part; None: r = 8, lora_alpha = 2 on the default (query and value) targets (GPT-2: the q and v
    thirds of its fused c_attn), gated."""

    def normalise(self) -> None:
        self.prefix_tuning = part_config(self.prefix_tuning, PrefixTuningConfig, PREFIX_DEFAULTS, "prefix_tuning")
        self.adapter = part_config(self.adapter, BottleneckConfig, ADAPTER_DEFAULTS, "adapter")
        self.lora = part_config(self.lora, LoraConfig, LORA_DEFAULTS, "lora")
        super().normalise()


@register("unipelt")
class UniPELT:
    """Prefix tuning's, the bottleneck adapter's and LoRA's own attach, on one placement."""

    config_class = UniPELTConfig

    def attach(self, placement: Placement, config: UniPELTConfig) -> None:
        PrefixTuning().attach(placement, config.prefix_tuning)
        Bottleneck().attach(placement, config.adapter)
        Lora().attach(placement, config.lora)
