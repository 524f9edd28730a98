"""Every key of peft's `adapter_config.json` (peft 0.21), sorted by what deltatune does with it.

A peft folder loads here only if deltatune computes what peft would compute with it. So each key of
peft's `LoraConfig`, `AdaLoraConfig`, `VeraConfig`, `IA3Config`, `LNTuningConfig`, `LoHaConfig`, `LoKrConfig`,
`OFTConfig`, `TrainableTokensConfig`, `PromptTuningConfig`, `PromptEncoderConfig` and `PrefixTuningConfig` is:

- read: deltatune implements it (it becomes a field of our config, or shapes the loaded tensors);
- tolerated: it does not change what the adapter computes (bookkeeping, or how the weights were
  initialised before they were trained and saved);
- refused: unless it holds its default, it changes the math in a way deltatune does not implement,
  and loading without it would give other outputs without a word.

`init_lora_weights` is read. Of the initialisations that also rewrite the base model's weights, PiSSA
("pissa") and OLoRA ("olora") load: peft itself recomputes their residual base from the original one
when it loads such a folder, and deltatune recomputes the same initial term (`methods/lora_init.py`);
so does KaSA's `kasa_config`, whose dropped singular components peft and deltatune recompute from the original
base (`methods/lora_kasa.py`).
The others are refused by name: the saved A and B only reproduce peft's outputs on the rewritten base
("pissa_niter_K" made it by a random draw, "corda" from data). A key that peft 0.21 does not have (a newer peft) is
tolerated with a warning naming it.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import DeltaTuneError
from .peft_releases import release_of

COMMON_TOLERATED = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)
"""Keys of every peft config that only describe the adapter (the task's heads, when peft adds them to
`modules_to_save`, are listed there)."""

LORA_READ = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "use_dora",
    "target_parameters",
    "lora_bias",
    "bias",
    "trainable_token_indices",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)

LORA_TOLERATED = {
    "fan_in_fan_out": "peft sets it from the layer type (False for Linear, True for GPT-2's Conv1D), as deltatune does",
    "megatron_core": "the module path of Megatron, used only with megatron_config",
    "loftq_config": "settings of the LoftQ initialisation, used only with init_lora_weights='loftq'",
    "eva_config": "settings of the EVA initialisation, which leaves the base alone",
    "corda_config": "settings of the CorDA initialisation, used only with init_lora_weights='corda'",
    "lora_ga_config": "settings of the LoRA-GA initialisation, used only with init_lora_weights='lora_ga'",
    "qalora_group_size": "used only with use_qalora",
    "runtime_config": "peft's runtime settings, never saved",
}

LORA_REFUSED: dict[str, tuple[Any, str]] = {
    "layer_replication": (None, "repeats layers of the base model"),
    "megatron_config": (None, "LoRA on Megatron's parallel layers"),
    "use_qalora": (False, "QA-LoRA: pooled inputs for quantized layers"),
    "alora_invocation_tokens": (None, "Activated LoRA: the adapter acts only from its invocation tokens on"),
    "arrow_config": (None, "Arrow: routing between several LoRA experts"),
    "ensure_weight_tying": (False, "the adapter of a tied embedding also acts at the output head"),
}
"""Key → (its default, what it does that deltatune does not)."""

ADALORA_READ = (
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "rank_pattern",
    "lora_alpha",
    "lora_dropout",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
)
"""peft's `AdaLoraConfig` keys that deltatune's `AdaLoraConfig` reads (`init_lora_weights`: any true value
is peft's one AdaLoRA init, which leaves the base alone)."""

ADALORA_TOLERATED = {
    **LORA_TOLERATED,
    "r": "peft's AdaLoRA ignores it: init_r is the rank",
    "use_rslora": "peft's AdaLoRA ignores it: the scale is lora_alpha / init_r",
    "alpha_pattern": "peft's AdaLoRA ignores it: every module gets lora_alpha",
}

ADALORA_REFUSED = {
    **LORA_REFUSED,
    "use_dora": (False, "DoRA, which peft's AdaLoRA refuses too"),
    "target_parameters": (None, "AdaLoRA on bare parameters, which deltatune implements for LoRA only"),
    "bias": ("none", "trains the biases of the base model, which deltatune implements for LoRA only"),
    "lora_bias": (False, "a bias on B, which deltatune implements for LoRA only"),
    "trainable_token_indices": (None, "trains rows of the embedding, which deltatune implements for LoRA only"),
    "use_bdlora": (None, "BD-LoRA's block-diagonal A or B, which deltatune implements for LoRA only"),
    "kasa_config": (None, "KaSA's truncated base and singular values, which deltatune implements for LoRA only"),
    "velora_config": (None, "VeLoRA's compressed backward pass, which deltatune implements for LoRA only"),
    "monteclora_config": (None, "MonteCLoRA's sampled A, which deltatune implements for LoRA only"),
}

PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
"""Initialisations (besides True and False) that leave the base model alone: the saved weights are the
whole adapter (MiCA's frozen B is saved with A)."""

RECOMPUTED_INITS = ("pissa", "olora")
"""Base-rewriting inits whose initial term s·B₀A₀ is a deterministic function of the original base
(full SVD, QR): peft and deltatune both recompute it when they load the folder."""

BASE_REWRITING_INITS = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "lora_ga": "LoRA-GA",
    "loftq": "LoftQ",
}
"""Prefix of an `init_lora_weights` value ("pissa_niter_16" is PiSSA) → the method, for those that
subtract the initial s·B·A from (or quantize) the base weights."""

CONVERTIBLE = ("pissa", "olora", "corda", "lora_ga")
"""The base-rewriting inits whose adapters peft itself converts to plain LoRA."""

IMPLEMENTED_INITS = ("pissa", "corda")
"""Base-rewriting families deltatune trains, whose unconverted peft folders it still cannot load
("pissa_niter_K", "corda": their residual base is not a function of the original base alone)."""

TRAINABLE_TOKENS_READ = ("token_indices", "target_modules", "init_weights")

SOFT_PROMPT_READ = ("num_virtual_tokens", "num_transformer_submodules", "modules_to_save")

SOFT_PROMPT_TOLERATED = {
    "token_dim": "the prompt's width, checked against the saved table's shape",
    "num_layers": "the prefix's layer count, checked against the saved table's shape",
    "num_attention_heads": (
        "the prefix's head count; the model's own splits the table, as for the model the file was made for"
    ),
    "prompt_tuning_init": "how the prompt started; the saved table is the trained prompt",
    "prompt_tuning_init_text": "how the prompt started",
    "tokenizer_name_or_path": "how the prompt started",
    "tokenizer_kwargs": "how the prompt started",
    "encoder_reparameterization_type": "the saved table is the encoder's output",
    "encoder_hidden_size": "the saved table is the encoder's output",
    "encoder_num_layers": "the saved table is the encoder's output",
    "encoder_dropout": "the saved table is the encoder's output",
    "prefix_projection": "the saved table is the projection's output",
    "init_weights": "how the prefix started",
}


LYCORIS_READ = (
    "r",
    "alpha",
    "rank_dropout",
    "module_dropout",
    "use_effective_conv2d",
    "init_weights",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
)
"""peft's `LoHaConfig` keys: deltatune computes every one of them (`methods/loha.py`)."""

LOKR_READ = (*LYCORIS_READ, "decompose_both", "decompose_factor", "rank_dropout_scale")
"""peft's `LoKrConfig` keys: LoHa's and the Kronecker factorisation's (`methods/lokr.py`)."""


def check_lora_keys(data: dict[str, Any]) -> None:
    """Refuse a peft LoRA config whose keys ask for math deltatune does not compute; warn about keys
    peft 0.21 does not have."""
    _refuse_set_keys(data, LORA_REFUSED)  # before the init: a refused key names the first problem
    check_init(data.get("init_lora_weights"))
    check_method_keys(data, LORA_READ, LORA_TOLERATED, LORA_REFUSED)


def _refuse_set_keys(data: dict[str, Any], refused: dict[str, tuple[Any, str]]) -> None:
    """Refuse the first key of `refused` (key → (default, meaning)) that `data` sets to another value."""
    for key, (default, meaning) in refused.items():
        value = data.get(key)
        if not _is_unset(value, default):
            raise DeltaTuneError(
                f"this peft adapter sets {key}={value!r} ({meaning}), which deltatune does not implement, "
                "so it would load with other outputs; retrain it without that option, or run it with peft"
            )


def check_init(value: Any) -> None:
    """Refuse the `init_lora_weights` values whose saved adapters deltatune cannot reproduce."""
    if value is None or isinstance(value, bool):
        return
    name = str(value).lower()
    if name in PLAIN_INITS or name in RECOMPUTED_INITS:
        return
    family = next((key for key in BASE_REWRITING_INITS if name.startswith(key)), None)
    if family is not None:
        method = BASE_REWRITING_INITS[family]
        remedy = (
            "convert it to plain LoRA with peft (save_pretrained(..., path_initial_model_for_weight_conversion="
            "<the adapter saved right after initialisation>)) and load that, or train with the default "
            "init_lora_weights=True"
            if family in CONVERTIBLE
            else "use it with peft on the base model LoftQ produced, or train with the default init_lora_weights=True"
        )
        raise DeltaTuneError(
            f"this peft adapter was made with init_lora_weights={value!r} ({method}), which also rewrites the "
            f"base model's weights{_randomized_note(name)}, so on the original base it gives other outputs; "
            f"{'' if family in IMPLEMENTED_INITS else f'deltatune does not implement {method} yet: '}{remedy}"
        )
    raise DeltaTuneError(
        f"this peft adapter was made with init_lora_weights={value!r} (an initialisation deltatune does not "
        "know, which may rewrite the base model); deltatune does not "
        "implement it yet: train with the default init_lora_weights=True"
    )


UNWRITABLE_INITS = {
    "pissa_niter_": "peft redraws its randomized SVD on load",
    "corda": "peft needs the data again to rebuild the residual base on load",
}
"""Prefix of an `init_lora_weights` value → why a peft folder of such an adapter, unconverted, would load
in peft with other outputs."""


def check_init_writable(value: Any) -> None:
    """Refuse to write a peft folder that peft would load with other outputs: the saved factors would
    meet another residual base (`UNWRITABLE_INITS`)."""
    reason = next((why for prefix, why in UNWRITABLE_INITS.items() if str(value).startswith(prefix)), None)
    if isinstance(value, str) and reason is not None:
        raise DeltaTuneError(
            f"a peft folder of an init_lora_weights={value!r} adapter would load in peft with other outputs "
            f"({reason}); convert it first (deltatune.to_plain_lora) and save that, or save it with "
            "format='deltatune'"
        )


def _randomized_note(name: str) -> str:
    """Why the residual base cannot be rebuilt from the original one."""
    if name.startswith("pissa_niter_"):
        return " from a randomized SVD that cannot be redrawn"
    return " from data the folder does not hold" if name == "corda" else ""


def _is_unset(value: Any, default: Any) -> bool:
    """Whether a key holds its default (missing, null, or an empty list or dict where the default is null)."""
    if value is None or value == default:
        return True
    return default is None and isinstance(value, (list, dict)) and not value


def _warn_unknown(data: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(
        key for key in data if key not in known and not _is_unset(data[key], None) and data[key] is not False
    )
    if unknown:
        warnings.warn(
            f"peft config keys {unknown} are not keys of peft 0.21, which deltatune reads; they are ignored "
            "(check that the adapter still gives the outputs you expect)",
            UserWarning,
            stacklevel=4,
        )


VERA_READ = (
    "r",
    "target_modules",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
    "init_weights",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
)

VERA_TOLERATED = {
    "fan_in_fan_out": "peft sets it from the layer type (False for Linear, True for GPT-2's Conv1D), as deltatune does",
}

VERA_REFUSED: dict[str, tuple[Any, str]] = {
    "bias": ("none", "trains the biases of the base model"),
}


def vera_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of our `VeraConfig` that a peft VeRA config sets."""
    return {key: data[key] for key in VERA_READ if data.get(key) is not None}


IA3_READ = (
    "target_modules",
    "exclude_modules",
    "feedforward_modules",
    "init_ia3_weights",
    "modules_to_save",
)
IA3_TOLERATED = {
    "fan_in_fan_out": "peft sets it from the layer type (False for Linear, True for GPT-2's Conv1D), as deltatune does"
}

LN_TUNING_READ = ("target_modules", "exclude_modules", "modules_to_save")


def check_method_keys(
    data: dict[str, Any],
    read: tuple[str, ...],
    tolerated: dict[str, str] | None = None,
    refused: dict[str, tuple[Any, str]] | None = None,
) -> None:
    """Refuse a peft config that sets a key of `refused` (key → (default, meaning)) away from its default,
    as that asks for math deltatune does not compute; warn about keys that are none of `read`, `tolerated`
    and `refused` (keys peft 0.21 does not have)."""
    _refuse_set_keys(data, refused or {})
    _warn_unknown(data, {*COMMON_TOLERATED, *read, *(tolerated or {}), *(refused or {})})


OFT_READ = (
    "r",
    "oft_block_size",
    "init_weights",
    "coft",
    "eps",
    "block_share",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
)

OFT_TOLERATED = {
    "fan_in_fan_out": "peft's OFT resets it to False on its only linear layer type, nn.Linear",
    "module_dropout": "peft 0.21 builds this dropout but never applies it, so the saved rotation is the whole adapter",
}

OFT_REFUSED: dict[str, tuple[Any, str]] = {
    "bias": ("none", "trains the biases of the base model"),
}


def check_oft_keys(data: dict[str, Any]) -> None:
    """Refuse a peft OFT config that asks for math deltatune does not compute (or that peft itself no longer
    reads: OFT before peft 0.14 had no `oft_block_size`); warn about keys peft 0.21 does not have."""
    if "oft_block_size" not in data:
        raise DeltaTuneError(
            "this peft OFT adapter has no oft_block_size: it was saved by peft before 0.14, whose OFT is another "
            "parametrisation that neither peft 0.21 nor deltatune reads; retrain it with a newer peft"
        )
    _refuse_set_keys(data, OFT_REFUSED)
    if data.get("use_cayley_neumann") and release_of(data.get("peft_version")) < (0, 18):
        warnings.warn(
            "this peft OFT adapter uses the Cayley-Neumann series and was saved by peft before 0.18, whose series "
            "differed; it loads with peft 0.21's series (as peft 0.21 loads it), so check its outputs or retrain it",
            UserWarning,
            stacklevel=4,
        )
    check_method_keys(data, OFT_READ, OFT_TOLERATED, OFT_REFUSED)
