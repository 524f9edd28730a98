"""peft's adapter files, read and written for the methods peft has (LoRA, prompt / P- / prefix tuning).

Facts of the format (peft 0.21): `adapter_config.json` holds `peft_type` ("LORA"), `task_type` and the
config fields under the same names as our `LoraConfig`; `adapter_model.safetensors` keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (`lora_embedding_A` / `_B` for
embeddings) and `base_model.model.<module path>.<parameter>` for `modules_to_save`, with no adapter name.
peft also stores a targeted embedding's base weight (`...base_layer.weight`); that key is ignored here.
Soft prompts ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"): one bare key `prompt_embeddings`, the table
the prompt encoder produces (n × token_dim; prefix: n × num_layers·2·token_dim), and the prompt's shape
in the config (`num_virtual_tokens`, `token_dim`, `num_layers`, `num_attention_heads`,
`num_transformer_submodules`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .config import DeltaConfig
from .errors import DeltaTuneError
from .methods.lora import LoraConfig
from .methods.p_tuning import p_tuning_from_peft
from .methods.prefix_tuning import prefix_tuning_from_peft
from .methods.prompt_tuning import prompt_tuning_from_peft
from .methods.soft_prompt import SoftPromptConfig

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
IGNORED_KEY = re.compile(r".*\.base_layer\.weight$")

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

PEFT_SAVED_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
UNSUPPORTED_OPTIONS = {"use_dora": False, "bias": "none", "lora_bias": False}
LORA_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
)


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


SOFT_PROMPT_READERS = {"PROMPT_TUNING": prompt_tuning_from_peft, "P_TUNING": p_tuning_from_peft, "PREFIX_TUNING": prefix_tuning_from_peft}
PROMPT_KEY = "prompt_embeddings"


def config_from_peft(data: dict[str, Any]) -> DeltaConfig:
    """Our config for a peft `adapter_config.json`; refuses options we do not compute."""
    peft_type = data.get("peft_type")
    if peft_type in SOFT_PROMPT_READERS:
        return SOFT_PROMPT_READERS[peft_type](data)
    if peft_type != "LORA":
        raise DeltaTuneError(f"this is a peft {peft_type} adapter; deltatune reads peft's LoRA, {', '.join(SOFT_PROMPT_READERS)} adapters")
    for key, plain in UNSUPPORTED_OPTIONS.items():
        if data.get(key, plain) not in (plain, None):
            raise DeltaTuneError(f"peft option {key}={data[key]!r} is not supported by deltatune's LoRA; retrain without it")
    fields = {key: data[key] for key in LORA_FIELDS if data.get(key) is not None}
    if fields.get("init_lora_weights") not in (True, False, "gaussian", None):
        fields["init_lora_weights"] = True  # the weights come from the file: the initialisation is moot
    return LoraConfig(**fields)


def config_to_peft(config: DeltaConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
    """peft's `adapter_config.json` for our adapter. Targets, ranks and alphas are written as resolved
    full module names, so peft selects exactly the modules we adapted with the same shapes."""
    if isinstance(config, SoftPromptConfig):
        return {"peft_version": PEFT_VERSION, "task_type": task_type_of(model), "inference_mode": True,
                "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None, **config.peft_fields(model)}
    if not isinstance(config, LoraConfig):
        raise DeltaTuneError(f"peft has no {config.method!r} method; save this adapter with format='deltatune'")
    return {
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "task_type": _task_type_for(model, config),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "target_modules": targets,
        "rank_pattern": {re.escape(n): config.rank_for(n) for n in targets if config.rank_for(n) != config.r},
        "alpha_pattern": {re.escape(n): config.alpha_for(n) for n in targets if config.alpha_for(n) != config.lora_alpha},
        "modules_to_save": config.modules_to_save,
        "bias": "none",
        "use_dora": False,
    }


def _task_type_for(model: nn.Module, config: LoraConfig) -> str | None:
    """The model's task type, unless peft would then expect head weights we did not save: for
    classification and QA task types peft adds the head (`classifier`, `score`, `qa_outputs`) to
    `modules_to_save` on its own. Without a task type peft loads the same weights as a plain model."""
    task_type = task_type_of(model)
    heads = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PEFT_SAVED_HEADS.get(task_type, ())]
    saved = config.modules_to_save or []
    if any(not any(head == entry or head.endswith("." + entry) for entry in saved) for head in heads):
        return None
    return task_type


def task_type_of(model: nn.Module) -> str | None:
    """peft's task type from the transformers class name (`LlamaForCausalLM` -> "CAUSAL_LM")."""
    class_name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if class_name.endswith(suffix)), None)


def peft_key(module_name: str, peft_name: str) -> str:
    """A tensor's key in peft's file; a soft prompt's table is the bare `prompt_embeddings`."""
    return peft_name if peft_name == PROMPT_KEY else f"{PREFIX}{module_name}.{peft_name}"


def tensors_from_peft(data: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """peft's seq2seq prompt (or P-) tuning keeps n rows per transformer submodule and feeds the first n
    to the encoder: keep those."""
    submodules = data.get("num_transformer_submodules") or 1
    if data.get("peft_type") in ("PROMPT_TUNING", "P_TUNING") and submodules > 1 and PROMPT_KEY in tensors:
        return {**tensors, PROMPT_KEY: tensors[PROMPT_KEY][: data["num_virtual_tokens"]]}
    return tensors
