"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, arXiv:2303.10512), as peft 0.21 computes it.

The update has the form of a singular value decomposition, P Λ Q in the paper:

         x ──► W ─────────────────────────┐
         │                                (+) ──► y = W x + b + s · B (E ⊙ A) dropout(x)
         └─► dropout ─► (E ⊙ A) ─► B ─────┘

    A (`lora_A`, Q): rank × in_features       right singular vectors
    E (`lora_E`, Λ): rank × 1                  singular values, broadcast over A's rows
    B (`lora_B`, P): out_features × rank       left singular vectors
    s = lora_alpha / (init_r + 10⁻⁵)           (lora_alpha = 0: rank / (init_r + 10⁻⁵), peft's rule)

ΔW = s · B (E ⊙ A) folds into W for merging. peft's init: E = 0 (the model starts equal to the base), A
and B ~ N(0, 0.02²). The denominator stays init_r when triplets are pruned (peft's `ranknum`), so pruning
a triplet changes ΔW by that triplet's term only.

The rank budget (`adalora_budget.RankAllocator`) masks triplets (E entries) of low importance during
training and records which are kept per module in `rank_pattern` ({module name: [kept, ...]}, init_r
flags). A saved adapter holds only the kept triplets (peft's files do the same), and a config with a
`rank_pattern` builds adapters of those pruned shapes. Layers: `nn.Linear`, transformers' `Conv1D` and
the quantized linears of `deltatune.quantized`; the LoRA machinery (the dropped input path, the fused
low-rank add, mixed batches, quantized shapes) is LoRA's own (`methods/lora.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
from torch import nn

from ..config import TargetedConfig
from ..errors import DeltaTuneError
from ..field_check import DropoutRate, NonNegativeFloat, NonNegativeInt, PositiveInt, Range
from ..peft_format import PeftCodec
from ..peft_keys import ADALORA_READ, ADALORA_REFUSED, ADALORA_TOLERATED, check_method_keys
from ..quantized import QUANTIZED_LINEARS
from ..registry import register
from .base import ModuleMethod
from .lora import LoraLinear, LoraQuantizedLinear

EmaFactor = Annotated[float, Range(above=0, below=1)]
"""An EMA factor: a number in (0, 1)."""
QUERY_VALUE = ["q_proj", "v_proj"]
ENCODER_DECODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
DEFAULT_TARGETS = {
    **dict.fromkeys(
        ["llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "gptj", "gpt_neo"], QUERY_VALUE
    ),
    **dict.fromkeys(["bart", "opt"], ENCODER_DECODER),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox"], ["query_key_value"]),
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
"""Modules adapted when `target_modules` is None, by model type: peft 0.21's AdaLoRA table (not LoRA's)."""
EPSILON = 1e-5
"""Added to init_r in the scaling's denominator (peft's `ranknum + 1e-5`)."""
INIT_STD = 0.02
"""Standard deviation of A and B at peft's init."""
PEFT_RANK_SUFFIX = ".lora_E"
"""peft keys `rank_pattern` by the module path plus this (and, before a save, the adapter name)."""


@dataclasses.dataclass
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA settings; names and defaults follow peft's `AdaLoraConfig`. Training has three phases:
    `tinit` steps at the full budget, the budget falling from init_r to target_r per module (cubic, every
    `deltaT` steps) until step `total_step - tfinal`, then `tfinal` steps with the final ranks fixed.
    A `deltatune train` config that leaves lora_alpha or orth_reg_weight out takes the recommended values for
    short runs instead (`train/method_defaults.py`; on peft's, a one-epoch adapter barely moves)."""

    target_r: PositiveInt = 8
    """The average rank per module at the end of the budget schedule."""
    init_r: PositiveInt = 12
    """The rank each module starts with."""
    tinit: NonNegativeInt = 0
    """Steps of warm-up at the full budget before any triplet is masked."""
    tfinal: NonNegativeInt = 0
    """Steps at the end that train the final ranks, with the mask fixed."""
    deltaT: PositiveInt = 1  # noqa: N815 (peft's name)
    """Steps between two budget allocations during the schedule."""
    beta1: EmaFactor = 0.85
    """EMA factor of the smoothed sensitivity |p · ∂L/∂p|, in (0, 1)."""
    beta2: EmaFactor = 0.85
    """EMA factor of the uncertainty |sensitivity − its EMA|, in (0, 1)."""
    orth_reg_weight: NonNegativeFloat = 0.5
    """Weight of the orthogonality regulariser added to the training loss: the mean over every A and B of
    ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (peft's form)."""
    total_step: PositiveInt | None = None
    """Total training steps, which the schedule needs. `deltatune train` sets it to the run's step count
    when it is not given; a loop of your own must give it (the allocator refuses to start without it)."""
    rank_pattern: dict[str, list[bool]] | None = None
    """{module name: a kept flag per initial triplet}, written by the allocator. A config with it builds
    pruned adapters (rank = the kept count) that keep the scale of init_r, as peft loads its folders."""
    lora_alpha: float = 8
    """Scale numerator: s = lora_alpha / (init_r + 10⁻⁵)."""
    lora_dropout: DropoutRate = 0.0
    """Dropout on the adapter's input path, as LoRA's."""
    init_lora_weights: bool = True
    """True: E = 0, A and B ~ N(0, 0.02²) (the model starts equal to the base); False: A, E and B ~ N(0, 1)
    (for tests: the adapter changes the output from the start)."""

    def validate(self) -> None:
        super().validate()
        if self.target_r > self.init_r:
            raise DeltaTuneError(
                f"target_r ({self.target_r}) is above init_r ({self.init_r}): the budget only falls; "
                "set init_r ≥ target_r"
            )
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        for module_name, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise DeltaTuneError(
                    f"rank_pattern[{module_name!r}] has {len(kept)} flags, init_r is {self.init_r}; give one kept "
                    "flag per initial triplet"
                )

    def rank_for(self, module_name: str) -> int:
        """The adapter's rank at `module_name`: the kept triplets of `rank_pattern`, else init_r."""
        kept = (self.rank_pattern or {}).get(module_name)
        return self.init_r if kept is None else sum(kept)

    def scaling_for(self, module_name: str) -> float:
        """s = lora_alpha / (init_r + 10⁻⁵), with peft's float32 denominator (`ranknum`)."""
        numerator = self.lora_alpha if self.lora_alpha > 0 else float(self.rank_for(module_name))
        return numerator / float(torch.tensor(float(self.init_r)) + EPSILON)


def check_schedule(config: AdaLoraConfig, total_step: int) -> None:
    """Refuse a schedule without a budgeting phase (peft's rule: tinit < total_step − tfinal)."""
    if config.tinit >= total_step - config.tfinal:
        raise DeltaTuneError(
            f"the AdaLoRA schedule has no budgeting phase: tinit ({config.tinit}) must be below total_step "
            f"({total_step}) − tfinal ({config.tfinal}); lower tinit or tfinal, or train for more steps"
        )


class SvdLinear(LoraLinear):
    """AdaLoRA on `nn.Linear` and GPT-2's `Conv1D`: LoRA's A and B with the singular values E between.
    `kept` (set by the allocator) marks the triplets a save keeps; None keeps them all."""

    def __init__(self, module: nn.Module, module_name: str, config: AdaLoraConfig) -> None:
        super().__init__(module, module_name, config)
        self.lora_E = nn.Parameter(self.lora_A.new_empty(self.rank, 1))
        with torch.no_grad():
            if config.init_lora_weights:
                nn.init.zeros_(self.lora_E)
            else:
                nn.init.normal_(self.lora_E)
        self.kept: list[bool] | None = None

    def reset(self, init: bool) -> None:
        """A and B ~ N(0, 0.02²), or N(0, 1) with `init` False (E is set in `__init__`)."""
        std = INIT_STD if init else 1.0
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=std)
            nn.init.normal_(self.lora_B, std=std)

    def down_projection(self) -> torch.Tensor:
        return self.lora_A * self.lora_E

    def file_state(self) -> dict[str, torch.Tensor]:
        """The kept triplets only (all of them while `kept` is None), as peft saves them."""
        if self.kept is None:
            return self.state_dict()
        rows = torch.tensor(self.kept, device=self.lora_A.device)
        return {
            "lora_A": self.lora_A.detach()[rows],
            "lora_B": self.lora_B.detach()[:, rows],
            "lora_E": self.lora_E.detach()[rows],
        }

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `file_state`: kept triplets into their rows, the others' E set to zero."""
        if self.kept is None:
            self.load_state_dict(tensors, strict=True)
            return
        rows = torch.tensor(self.kept, device=self.lora_A.device)
        with torch.no_grad():
            self.lora_A[rows] = tensors["lora_A"].to(self.lora_A)
            self.lora_B[:, rows] = tensors["lora_B"].to(self.lora_B)
            self.lora_E.zero_()
            self.lora_E[rows] = tensors["lora_E"].to(self.lora_E)

    def extra_repr(self) -> str:
        kept = "" if self.kept is None else f", kept={sum(self.kept)}"
        return f"rank={self.rank}{kept}, scaling={self.scaling:g}"


class SvdQuantizedLinear(SvdLinear, LoraQuantizedLinear):
    """AdaLoRA on a quantized linear: shapes from the logical in/out features, float32 factors (LoRA's rule)."""


class AdaLoraPeft(PeftCodec):
    """AdaLoRA in peft's files: the config fields under peft's names (targets as resolved full module
    names), the tensors `lora_A`, `lora_B`, `lora_E` (no `.weight`: peft keeps them in ParameterDicts), the
    kept triplets only, and `rank_pattern` keyed `<module path>.lora_E` as peft writes it."""

    peft_type = "ADALORA"
    tensor_names = {SvdLinear: {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, ADALORA_READ, ADALORA_TOLERATED, ADALORA_REFUSED)

    def config_to_peft(self, config: AdaLoraConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        if config.total_step is None:
            raise DeltaTuneError(
                "peft's AdaLoraConfig needs total_step, which this adapter's config lacks; set total_step (the "
                "run's optimizer steps) in the config, or save with format='deltatune'"
            )
        pattern = config.rank_pattern
        return {
            **{name: getattr(config, name) for name in _OWN_FIELDS},
            "target_modules": targets,
            "rank_pattern": None if pattern is None else {f"{k}{PEFT_RANK_SUFFIX}": v for k, v in pattern.items()},
            "bias": "none",
        }

    def config_from_peft(self, data: dict[str, Any]) -> AdaLoraConfig:
        fields = {key: data[key] for key in ADALORA_READ if data.get(key) is not None}
        if "rank_pattern" in fields:
            fields["rank_pattern"] = {
                key.split(PEFT_RANK_SUFFIX + ".")[0].removesuffix(PEFT_RANK_SUFFIX): value
                for key, value in fields["rank_pattern"].items()
            }
        fields["init_lora_weights"] = fields.get("init_lora_weights", True) is not False  # peft: any true value
        return AdaLoraConfig(**fields)


_OWN_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(AdaLoraConfig)
    if field.name not in {f.name for f in dataclasses.fields(TargetedConfig)} | {"rank_pattern"}
)
"""The fields peft's file gets as they are (the targets go as resolved names, the pattern re-keyed)."""


def _adapter_types() -> dict[type | str, type[SvdLinear]]:
    from transformers.pytorch_utils import Conv1D

    return {**dict.fromkeys(QUANTIZED_LINEARS, SvdQuantizedLinear), nn.Linear: SvdLinear, Conv1D: SvdLinear}


@register("adalora")
class AdaLora(ModuleMethod):
    """AdaLoRA on the selected Linear and Conv1D layers; `adalora_budget.RankAllocator` runs its budget."""

    config_class = AdaLoraConfig
    adapter_types = _adapter_types()
    peft_codec = AdaLoraPeft()
    targets_by_model_type = DEFAULT_TARGETS
    schedule_counts_steps = True
    """Its rank budget (`RankAllocator`) runs over the total step count: no time budget (`train/time_budget.py`)."""

    def training_hook(self, delta_model: Any, name: str, total_steps: int) -> Any:
        """The trainer's per-step work for adapter `name`: the rank allocator (see `adalora_budget`)."""
        from .adalora_budget import RankAllocator

        return RankAllocator(delta_model, name, default_total_step=total_steps)

    def trainer_loss_terms(self, config: AdaLoraConfig) -> list[str]:
        """The term the rank allocator adds to the loss (`orthogonal_loss`), for the run identity."""
        return ["orth_reg_weight"]
