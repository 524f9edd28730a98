"""peft's adapter files: the rules every method shares. What is a method's own (its peft type, its config
fields, its tensor names) is its codec, a `PeftCodec` the method class declares as `peft_codec`.

Facts of the format (peft 0.21): `adapter_config.json` holds `peft_type`, `task_type`, `peft_version`,
`base_model_name_or_path`, `inference_mode` and `modules_to_save`, then the method's fields;
`adapter_model.safetensors` keys carry no adapter name: `base_model.model.<module path>.<tensor>` for the
method's tensors (`lora_A.weight`; soft prompts use one bare key, `prompt_embeddings`) and
`base_model.model.<module path>.<parameter>` for a `modules_to_save` copy. peft adds the task's heads
(`classifier`, `score`, `qa_outputs`) to `modules_to_save` on its own and lists them whether or not the
model has them: only the entries whose weights the file holds are read.
With `save_embedding_layers` peft also stores the model's whole embedding weights (`<path>.base_layer.weight`
for an adapted embedding, `<path>.weight` else) and writes them into the base when it loads: here such a
copy must equal the model's own weights (it is then dropped), since deltatune never rewrites the base.
Which config keys are read, tolerated or refused: `peft_keys`; which release introduced each: `peft_releases`.

The codecs come from the registered methods (`codec_of_type`), so a method registered outside the library
reads and writes peft's folders with no edit here. Built in, each in its method's file: LoRA, AdaLoRA, VeRA,
IA3, LN tuning, trainable tokens, prompt, P- and prefix tuning (the soft prompts' shared part in
`methods/soft_prompt_peft.py`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.models.auto import modeling_auto

from .config import DeltaConfig
from .errors import AdapterShapeError, DeltaTuneError
from .files import read_tensors
from .methods.base import lookup_type
from .methods.module_copy import ModuleCopy
from .peft_releases import lean_config
from .registry import get_method, registered_methods
from .site_adapter import SiteAdapter
from .targeting import matches

if TYPE_CHECKING:
    from .model import DeltaModel

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
BASE_LAYER = ".base_layer"

AUTO_CLASS_TASKS = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "CAUSAL_LM",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "SEQ_2_SEQ_LM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "SEQ_CLS",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "TOKEN_CLS",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "QUESTION_ANS",
}
"""transformers' table of the classes of one auto class (`AutoModelForCausalLM`: model type → class name)
→ peft's task type for those classes; the first table listing a class decides."""

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

PEFT_SAVED_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class PeftCodec(abc.ABC):
    """One method's part of peft's format. A subclass sets `peft_type` and `tensor_names` and translates
    configs; the other hooks have defaults that fit a method whose adapters store all their tensors."""

    peft_type: ClassVar[str] = ""
    """peft's name for the method: the `peft_type` its config files hold ("LORA")."""
    model_prefix: ClassVar[str] = PREFIX
    """What comes before a module path in the method's tensor keys: `base_model.model.` where peft puts
    a tuner model between its wrapper and the model (LoRA); soft prompts wrap the model directly, so
    theirs (the copies of `modules_to_save`) are `base_model.<path>`."""
    tensor_names: ClassVar[dict[type, dict[str, str]]] = {}
    """Adapter type (or a base of it) → {tensor name in its `file_state()`: peft's name after the module
    path}: `{LoraLinear: {"lora_A": "lora_A.weight", ...}}`."""

    @abc.abstractmethod
    def config_to_peft(self, config: DeltaConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        """The method's own fields of peft's `adapter_config.json` for `config`, placed at `targets` of `model`."""

    @abc.abstractmethod
    def config_from_peft(self, data: dict[str, Any]) -> DeltaConfig:
        """Our config for peft's `adapter_config.json` `data` (`modules_to_save` is read for every method)."""

    def check_keys(self, data: dict[str, Any]) -> None:  # noqa: B027 (a hook: most codecs accept every key)
        """Refuse config keys that ask for math the method does not compute (before `config_from_peft`)."""

    def task_type(self, config: DeltaConfig, model: nn.Module) -> str | None:
        """The `task_type` to write: the model's, unless peft would then expect head weights not saved."""
        return task_type_with_saved_heads(model, config.modules_to_save or [])

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        """The key in peft's file of tensor `tensor_name` of `adapter`, placed at `module_name`."""
        names = lookup_type(self.tensor_names, type(adapter), {})
        if tensor_name not in names:
            raise DeltaTuneError(
                f"{type(self).__name__} gives no peft name for tensor {tensor_name!r} of {type(adapter).__name__}; "
                "add it to the codec's tensor_names"
            )
        return f"{self.model_prefix}{module_name}.{names[tensor_name]}"

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        """What peft's file stores of `adapter`, under the names of `adapter.file_state()`: all of it."""
        return adapter.file_state()

    def tensors_from_peft(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's tensors among those of a peft file (`data`: its config); all of them by default."""
        return tensors


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """How one adapter's tensors are named and stored in peft's weights file: its `modules_to_save`
    copies by peft's general rule, the rest by its method's codec."""

    codec: PeftCodec

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        if self._saved_copy(adapter):
            return f"{self.codec.model_prefix}{module_name}.{tensor_name}"
        return self.codec.tensor_key(module_name, adapter, tensor_name)

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        return adapter.file_state() if self._saved_copy(adapter) else self.codec.file_state(adapter)

    def _saved_copy(self, adapter: SiteAdapter) -> bool:
        """A `modules_to_save` copy; a method's own kind of copy (LN tuning's) is named by its codec."""
        return isinstance(adapter, ModuleCopy) and lookup_type(self.codec.tensor_names, type(adapter), None) is None


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def codec_of_method(method: str) -> PeftCodec | None:
    """The codec registered method `method` declares (`peft_codec` on its class); None for a method
    peft lacks, which declares none."""
    return getattr(get_method(method), "peft_codec", None)


def codec_of_type(peft_type: str | None) -> PeftCodec:
    """The codec that reads peft type `peft_type`: the one registered method whose codec has that type."""
    declared = {name: codec for name in registered_methods() if (codec := codec_of_method(name)) is not None}
    found = {name: codec for name, codec in declared.items() if codec.peft_type == peft_type}
    if not found:
        readable = sorted({codec.peft_type for codec in declared.values()})
        raise DeltaTuneError(
            f"this is a peft {peft_type} adapter; deltatune reads peft's {', '.join(readable)} adapters"
        )
    if len({id(codec) for codec in found.values()}) > 1:
        raise DeltaTuneError(
            f"the registered methods {', '.join(map(repr, sorted(found)))} all read peft type {peft_type!r}, so this "
            "folder could be either; register only one of them, or give the others another peft_type"
        )
    return next(iter(found.values()))


def adapter_files(delta_model: DeltaModel, name: str) -> tuple[dict[str, Any], PeftLayout]:
    """peft's `adapter_config.json` for adapter `name` of `delta_model`, and the layout of its weights file.
    The config holds only the keys that the oldest release able to read the adapter knows (`peft_releases`)."""
    config = delta_model.configs[name]
    codec = codec_of_method(config.method)
    if codec is None:
        raise DeltaTuneError(
            f"peft has no {config.method!r} method (it declares no peft codec); save this adapter with "
            "format='deltatune'"
        )
    model = delta_model.base_model
    data = {
        "peft_type": codec.peft_type,
        "peft_version": PEFT_VERSION,
        "task_type": codec.task_type(config, model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "inference_mode": True,
        **codec.config_to_peft(config, delta_model.targets[name], model),
        "modules_to_save": config.modules_to_save,
    }
    return lean_config(data), PeftLayout(codec)


def read_adapter(
    data: dict[str, Any], weights: Path, model: nn.Module
) -> tuple[DeltaConfig, dict[str, torch.Tensor], PeftLayout]:
    """(our config, the adapter's tensors, their layout) for a peft folder whose config is `data` and
    whose tensors are in `weights`; refuses options we do not compute."""
    codec = codec_of_type(data.get("peft_type"))
    codec.check_keys(data)
    config = codec.config_from_peft(data)
    tensors = _without_embedding_copies(codec.tensors_from_peft(data, read_tensors(weights)), data, model)
    return _keep_saved_modules(config, data, tensors, model, codec.model_prefix), tensors, PeftLayout(codec)


def task_type_with_saved_heads(model: nn.Module, saved: list[str]) -> str | None:
    """The model's task type, unless peft would then expect head weights we did not save: for
    classification and QA task types peft adds the head (`classifier`, `score`, `qa_outputs`) to
    `modules_to_save` on its own. Without a task type peft loads the same weights as a plain model."""
    task_type = task_type_of(model)
    heads = [
        name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PEFT_SAVED_HEADS.get(task_type, ())
    ]
    if any(not any(head == entry or head.endswith("." + entry) for entry in saved) for head in heads):
        return None
    return task_type


def task_type_of(model: nn.Module) -> str | None:
    """peft's task type for the model's class: that of the transformers auto class listing it
    (`GPT2LMHeadModel` → "CAUSAL_LM"), else by its name's suffix (a class of remote code: `...ForCausalLM`)."""
    class_name = type(model).__name__
    listed = _auto_class_tasks().get(class_name)
    return listed or next((task for suffix, task in TASK_TYPES.items() if class_name.endswith(suffix)), None)


@functools.cache
def _auto_class_tasks() -> dict[str, str]:
    """Class name → peft task type, for every class that transformers' auto classes of `AUTO_CLASS_TASKS` list."""
    tasks: dict[str, str] = {}
    for table_name, task in AUTO_CLASS_TASKS.items():
        for names in getattr(modeling_auto, table_name).values():
            for name in (names,) if isinstance(names, str) else names:
                tasks.setdefault(name, task)
    return tasks


def _keep_saved_modules(
    config: DeltaConfig, data: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module, prefix: str
) -> DeltaConfig:
    """`config` with the `modules_to_save` entries of `data` whose weights the file holds (peft lists
    default heads whether or not the model has them)."""
    entries = data.get("modules_to_save")
    if not entries:
        return config
    names = [n for n, _ in model.named_modules()]
    kept = [
        entry
        for entry in dict.fromkeys([entries] if isinstance(entries, str) else entries)
        if any(
            (n == entry or n.endswith("." + entry)) and any(k.startswith(prefix + n + ".") for k in tensors)
            for n in names
        )
    ]
    return config.replace(modules_to_save=kept or None)


def _without_embedding_copies(tensors: dict[str, Any], data: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`tensors` without the copies of the model's embedding weights (`save_embedding_layers`), each
    checked against the model."""
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
    module_name = key[len(PREFIX) : -len(".weight")]
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
