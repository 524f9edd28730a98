"""Each method's recommended training settings, used where a training config leaves them out.

A `TrainConfig` whose `learning_rate`, `head_learning_rate`, `scheduler` or `warmup_ratio` is not set
(None), or whose `adapter` section leaves out a field listed here, takes the value of its method's row
(`DEFAULTS`; a method without a row takes `FALLBACK`, said so in its source). A value the config sets
is never replaced. The resolved values are the config's own from then on: what the run records in
metrics.json and its checkpoints' run identity (`fingerprint.py`), so a `--resume` after this table
changes is refused rather than continued with other numbers.

Learning rates are AdamW's (the trainer's optimizer) for short runs of a few hundred steps; each
source gives the published recipe the row starts from, and why it departs from it. The SST-2 checks
on all-MiniLM-L6-v2 are in docs/defaults.md. `head_learning_rate` is the rate of the new task head that trains
fully beside the adapter (`optimizer.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

WARMUP_RATIO = 0.06
"""Warm-up as a share of the run's steps: RoBERTa's GLUE recipe (Liu et al. 2019), kept by the LoRA paper."""
HEAD_LEARNING_RATE = 2e-3
"""The new head's rate unless a method's row says otherwise: LoRA's rate, and on SST-2 (docs/defaults.md)
the head rate at which full fine-tuning and LoRA at 5e-4 left ln 2 within 40 steps."""


@dataclasses.dataclass(frozen=True)
class MethodDefaults:
    """One method's recommended settings and where they come from."""

    learning_rate: float
    source: str
    """The paper or measurement behind the row, in a sentence."""
    head_learning_rate: float = HEAD_LEARNING_RATE
    scheduler: str = "linear"
    warmup_ratio: float = WARMUP_RATIO
    adapter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Method config fields filled in where the config's `adapter` section leaves them out."""


LORA_FAMILY_SOURCE = "no recipe of its own measured here: LoRA's rate (low-rank updates of the same weights)"

DEFAULTS: dict[str, MethodDefaults] = {
    "full": MethodDefaults(
        5e-5,
        "BERT/RoBERTa fine-tuning (Devlin et al. 2019: 2e-5..5e-5; the top of the range for one short epoch); "
        "its new head at 2e-3 (SST-2, 40 steps: 68.1 % against 50.9 % with the head at 5e-5)",
    ),
    "lora": MethodDefaults(
        2e-3,
        "LoRA (Hu et al. 2021, Table 9: r 8 on query/value, 5e-4 over 60 epochs); 2e-3 for one epoch (issue 15: "
        "0.6 points from full fine-tuning, where 5e-4 trailed by 3.4; SST-2 held-out phrases, one epoch: 87.5 %, "
        "1e-3 86.9 %, within noise); every linear layer but the head (QLoRA, Dettmers et al. 2023: all layers "
        "needed to match full fine-tuning; SST-2 held-out phrases, one epoch: 87.31 % against 86.38 % on "
        "query/value)",
        adapter={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    ),
    "bottleneck": MethodDefaults(
        1e-3,
        "Houlsby et al. 2019 (rates 3e-5..3e-3 swept, adapters need more than full fine-tuning); Pfeiffer et "
        "al. 2021 (AdapterHub: reduction factor 16, 1e-4..1e-3)",
        adapter={"reduction_factor": 16},
    ),
    "compacter": MethodDefaults(3e-3, "Compacter (Mahabadi et al. 2021: 3e-3, PHM dimension 4, rank 1)"),
    "bitfit": MethodDefaults(
        5e-3,
        "BitFit (Ben Zaken et al. 2022: 1e-4..1e-3 over many epochs); 5e-3 for one epoch, as few parameters train "
        "(SST-2 held-out phrases, one epoch: 85.0 %, 1e-2 84.3 %, 2e-2 one class)",
    ),
    "ia3": MethodDefaults(3e-3, "IA3 (Liu et al. 2022, T-Few: 3e-3)"),
    "prompt_tuning": MethodDefaults(
        3e-2,
        "Prompt tuning (Lester et al. 2021: 0.3 with Adafactor, 20-100 tokens); 3e-2 with AdamW, 20 tokens",
        adapter={"num_virtual_tokens": 20},
    ),
    "p_tuning": MethodDefaults(
        1e-3,
        "P-tuning (Liu et al. 2021: an MLP prompt encoder); P-tuning v2 (Liu et al. 2022: 20 tokens for "
        "classification)",
        adapter={"num_virtual_tokens": 20},
    ),
    "prefix_tuning": MethodDefaults(
        5e-3,
        "P-tuning v2 (Liu et al. 2022: deep prompts without reparameterisation, 5e-3..1e-2, 20 tokens for "
        "classification); prefix tuning (Li and Liang 2021: 5e-5 with its MLP, 10 tokens for table-to-text)",
        adapter={"num_virtual_tokens": 20},
    ),
    "adalora": MethodDefaults(
        1e-2,
        "AdaLoRA (Zhang et al. 2023: 8e-4..1e-3 over ~25 epochs, scale lora_alpha/init_r 8..16, orthogonality "
        "weight 0.1); for one short epoch: scale 8 (lora_alpha 96 at init_r 12), no orthogonality term, 1e-2 "
        "(docs/defaults.md: on peft's defaults the adapter did nothing, 54.1 % on SST-2 dev, as the head alone)",
        adapter={"lora_alpha": 96, "orth_reg_weight": 0.0},
    ),
    "loha": MethodDefaults(2e-3, LORA_FAMILY_SOURCE),
    "lokr": MethodDefaults(2e-3, LORA_FAMILY_SOURCE),
    "oft": MethodDefaults(2e-3, LORA_FAMILY_SOURCE),
    "vera": MethodDefaults(4e-3, "VeRA (Kopiczko et al. 2024: rates of 4e-3 and more for its few scaling vectors)"),
}

FALLBACK = MethodDefaults(
    1e-3,
    "no recommended settings for this method: a rate between full fine-tuning's and the small adapters'",
)
"""The settings of a method without a row (fusion, ln_tuning, trainable_tokens, a custom method)."""


def defaults_for(method: str) -> MethodDefaults:
    """The recommended settings of `method` (FALLBACK for a method without a row)."""
    return DEFAULTS.get(method, FALLBACK)


def fill_defaults(config: Any) -> None:
    """Set each field `config` (a TrainConfig) leaves out to its method's recommended value: the
    `TRAINING_FIELDS` that are None (`warmup_ratio` only where `warmup_steps` is None too, as it is used
    only then) and the row's `adapter` fields absent from `config.adapter`."""
    row = defaults_for(str(config.adapter["method"]))
    for name in TRAINING_FIELDS:
        if getattr(config, name) is None and not (name == "warmup_ratio" and config.warmup_steps is not None):
            setattr(config, name, getattr(row, name))
    config.adapter = {"method": config.adapter["method"], **row.adapter, **config.adapter}


TRAINING_FIELDS = ("learning_rate", "head_learning_rate", "scheduler", "warmup_ratio")
"""The TrainConfig fields whose default is the method's recommended value."""
