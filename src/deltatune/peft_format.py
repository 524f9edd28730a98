"""peft's adapter files, read and written for the methods peft has (LoRA, prompt / P- / prefix tuning).

Facts of the format (peft 0.21): `adapter_config.json` holds `peft_type` ("LORA"), `task_type` and the
config fields under the same names as our `LoraConfig`; `adapter_model.safetensors` keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (`lora_embedding_A` / `_B` for
embeddings) and `base_model.model.<module path>.<parameter>` for `modules_to_save`, with no adapter name.
With `save_embedding_layers` peft also stores the model's whole embedding weights (`<path>.base_layer.weight`
for an adapted embedding, `<path>.weight` else) and writes them into the base when it loads: here such a
copy must equal the model's own weights (it is then dropped), since deltatune never rewrites the base.
Which config keys are read, tolerated or refused: `peft_keys`.
Soft prompts ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"): one bare key `prompt_embeddings`, the table
the prompt encoder produces (n × token_dim; prefix: n × num_layers·2·token_dim), and the prompt's shape
in the config (`num_virtual_tokens`, `token_dim`, `num_layers`, `num_attention_heads`,
`num_transformer_submodules`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .config import DeltaConfig
from .errors import AdapterShapeError, DeltaTuneError
from .methods.lora import LoraConfig
from .methods.p_tuning import p_tuning_from_peft
from .methods.prefix_tuning import prefix_tuning_from_peft
from .methods.prompt_tuning import prompt_tuning_from_peft
from .methods.soft_prompt import SoftPromptConfig
from .peft_keys import LORA_READ, check_lora_keys, check_soft_prompt_keys
from .targeting import matches

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
BASE_LAYER = ".base_layer"

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

PEFT_SAVED_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


SOFT_PROMPT_READERS = {"PROMPT_TUNING": prompt_tuning_from_peft, "P_TUNING": p_tuning_from_peft, "PREFIX_TUNING": prefix_tuning_from_peft}
PROMPT_KEY = "prompt_embeddings"


def config_from_peft(data: dict[str, Any]) -> DeltaConfig:
    """Our config for a peft `adapter_config.json`; refuses options we do not compute."""
    peft_type = data.get("peft_type")
    if peft_type in SOFT_PROMPT_READERS:
        check_soft_prompt_keys(data)
        return SOFT_PROMPT_READERS[peft_type](data)
    if peft_type != "LORA":
        raise DeltaTuneError(f"this is a peft {peft_type} adapter; deltatune reads peft's LoRA, {', '.join(SOFT_PROMPT_READERS)} adapters")
    check_lora_keys(data)
    fields = {key: data[key] for key in LORA_READ if data.get(key) is not None}
    if fields.get("init_lora_weights") not in (True, False, "gaussian", None):
        fields["init_lora_weights"] = True  # a plain init ("eva", "orthogonal"): the weights come from the file
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


PROMPT_LEARNING_PREFIX = "base_model."
"""peft's soft prompts wrap the model directly (no tuner model between): their `modules_to_save` keys
are `base_model.<module path>.<parameter>`, without the `model.` that LoRA's have."""


def soft_prompt_keys_from_peft(tensors: dict[str, Any]) -> dict[str, Any]:
    """A soft-prompt file's keys in the form `peft_key` gives (`base_model.model.<path>`)."""
    return {key if key == PROMPT_KEY else PREFIX + key.removeprefix(PROMPT_LEARNING_PREFIX): tensor for key, tensor in tensors.items()}


def soft_prompt_keys_to_peft(tensors: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `soft_prompt_keys_from_peft`: the keys peft's soft prompts read."""
    return {key if key == PROMPT_KEY else PROMPT_LEARNING_PREFIX + key.removeprefix(PREFIX): tensor for key, tensor in tensors.items()}


def peft_key(module_name: str, peft_name: str) -> str:
    """A tensor's key in peft's file; a soft prompt's table is the bare `prompt_embeddings`."""
    return peft_name if peft_name == PROMPT_KEY else f"{PREFIX}{module_name}.{peft_name}"


def tensors_from_peft(data: dict[str, Any], tensors: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The adapter's tensors in a peft file. peft's seq2seq prompt (or P-) tuning keeps n rows per
    transformer submodule and feeds the first n to the encoder: keep those. Copies of the model's
    embedding weights (`save_embedding_layers`) are checked against the model and dropped."""
    submodules = data.get("num_transformer_submodules") or 1
    if data.get("peft_type") in SOFT_PROMPT_READERS:
        tensors = soft_prompt_keys_from_peft(tensors)
    if data.get("peft_type") in ("PROMPT_TUNING", "P_TUNING") and submodules > 1 and PROMPT_KEY in tensors:
        tensors = {**tensors, PROMPT_KEY: tensors[PROMPT_KEY][: data["num_virtual_tokens"]]}
    saved = data.get("modules_to_save") or []
    kept = {}
    for key, tensor in tensors.items():
        parameter = _embedding_copy_of(key, model, saved)
        if parameter is None:
            kept[key] = tensor
        elif not _same_weights(tensor, model.get_parameter(parameter)):
            raise AdapterShapeError(
                f"the peft file holds {key!r}, its own copy of the model's {parameter} (peft's "
                "save_embedding_layers: the embeddings were resized or trained), and it differs from this "
                "model's; deltatune never rewrites base weights, so load the adapter onto the model those "
                f"embeddings belong to, or copy that tensor into model.{parameter} first"
            )
    return kept


def _embedding_copy_of(key: str, model: nn.Module, saved: list[str]) -> str | None:
    """The model parameter a peft key copies whole, for an embedding layer peft saved with
    `save_embedding_layers` (not as one of `modules_to_save`); None for the adapter's own tensors."""
    if not key.startswith(PREFIX) or not key.endswith(".weight"):
        return None
    module_name = key[len(PREFIX): -len(".weight")]
    adapted = module_name.endswith(BASE_LAYER)
    module_name = module_name.removesuffix(BASE_LAYER)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if not isinstance(getattr(module, "weight", None), nn.Parameter) or matches(module_name, saved):
        return None
    return f"{module_name}.weight" if adapted or any(module is layer for layer in _embedding_layers(model)) else None


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embeddings (transformers models; none for others)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError):
            continue
    return [layer for layer in layers if layer is not None]


def _same_weights(stored: torch.Tensor, current: torch.Tensor) -> bool:
    """Equal in the coarser of the two dtypes (a float32 copy of bfloat16 weights is the same weights)."""
    if stored.shape != current.shape:
        return False
    if not (stored.is_floating_point() and current.is_floating_point()):
        return torch.equal(stored.to(current.device), current.detach())
    coarser = min((stored.dtype, current.dtype), key=lambda dtype: torch.finfo(dtype).bits)
    return torch.equal(stored.to(device=current.device, dtype=coarser), current.detach().to(coarser))
