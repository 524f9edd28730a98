"""Loading a model and tokenizer, from local folders only, and attaching the adapter: the one way
`train`, `eval`, `merge` and `inspect` load a model.

A model is a local transformers folder, a GGUF file (`path/to/file.gguf`: transformers dequantizes it to
float32, or with `quantize: gguf` deltatune keeps its blocks, `deltatune.gguf`) or a packaged model name
(`PACKAGED_MODELS`; those that ship as a GGUF file are in `PACKAGED_GGUF`). Nothing is ever downloaded:
loads run with `local_files_only=True`. Task heads that start untrained (a classifier)
are always added to the adapter's `modules_to_save`, after the modules the config lists (as peft
does), even where the config lists none (`[]`): a freshly initialised head that stays frozen would
leave the model predicting from random weights. Such a new head is said in one plain line instead of
transformers' load report, and weights missing elsewhere are warned of by name (`load_report`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..model import DeltaModel
from .load_report import held_load_report, report_load
from .tasks import TaskType, trained_heads


def _smollm2() -> Path:
    from .smollm2 import smollm2_folder

    return smollm2_folder()


def _smollm2_gguf() -> Path:
    from .smollm2 import gguf_path

    return gguf_path()


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"smollm2": _smollm2}
"""Model names that resolve to a folder deltatune builds from an installed package."""
PACKAGED_GGUF: dict[str, Callable[[], Path]] = {"smollm2": _smollm2_gguf}
"""Packaged model names whose package ships a GGUF file (what `quantize: gguf` loads for them)."""
GGUF_SUFFIX = ".gguf"


def _gguf_path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise DeltaTuneError(f"model {name!r} names a GGUF file that does not exist; give the path of a .gguf file")
    return path


def gguf_file(name: str) -> Path:
    """The GGUF file `quantize: gguf` loads for model `name`: a packaged model's, or the `.gguf` path given."""
    if name in PACKAGED_GGUF:
        return PACKAGED_GGUF[name]()
    if not name.endswith(GGUF_SUFFIX):
        raise DeltaTuneError(
            f"quantize: gguf loads a GGUF file, and model {name!r} is none; give the path of a .gguf file or one of "
            f"the packaged models that ship one: {', '.join(PACKAGED_GGUF)}"
        )
    return _gguf_path(name)


def model_folder(name: str) -> Path:
    """The local folder of model `name` (a path, or a packaged model name); for a GGUF file, the file."""
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name]()
    if name.endswith(GGUF_SUFFIX):
        return _gguf_path(name)
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise DeltaTuneError(
            f"model {name!r} is not a local model folder (no config.json there); give the path of a folder "
            f"saved with save_pretrained, or one of the packaged models: {', '.join(PACKAGED_MODELS)}"
        )
    return folder


def weights_source(name: str, quantize: str | None) -> Path:
    """Where `load_model(name, quantize=quantize)` reads the weights: the GGUF file with `quantize: gguf`,
    else the model's folder (or GGUF file)."""
    return gguf_file(name) if quantize == "gguf" else model_folder(name)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    folder = PACKAGED_MODELS[name]() if name in PACKAGED_MODELS else Path(name)
    from_file = {"gguf_file": folder.name} if folder.name.endswith(GGUF_SUFFIX) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder.parent if from_file else folder), local_files_only=True, **from_file
        )
    except (OSError, ValueError) as error:
        raise DeltaTuneError(
            f"cannot load a tokenizer from {folder} ({type(error).__name__}); set `tokenizer:` to a folder that holds "
            "one"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def saved_model_class(folder: Path) -> Any:
    """The transformers class the folder's config names (its `architectures`), else `AutoModel`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    named = (getattr(transformers, name) for name in config.architectures or [] if hasattr(transformers, name))
    return next(named, transformers.AutoModel)


def load_model(
    name: str,
    task: TaskType | None = None,
    tokenizer: Any = None,
    label_names: Sequence[str] = (),
    quantize: str | None = None,
    device: str = "cpu",
    *,
    quiet: bool = False,
    adapter: str | Path | None = None,
) -> nn.Module:
    """The model in folder, GGUF file or packaged name `name`: loaded with `task`'s auto class (labels set
    for classification), or without a task with the class its config names. A tokenizer's pad id fills
    in a config that has none. `quantize` (a name of `quantize.QUANTIZE_OPTIONS`) loads the linear
    layers quantized, onto `device`, computing in float32; its backend is checked before anything loads.
    `quantize: gguf` builds the model of `gguf_file(name)` with its blocks kept (`deltatune.gguf`).
    transformers' load report (for a GGUF-kept base, which transformers does not load, the same loading info
    from `load_gguf_model`) is said plainly (`load_report.report_load`): a new head in one line unless
    `quiet`, or nothing where `adapter` (the folder loaded onto the model next) holds that head."""
    labels: dict[str, Any] = {}
    if label_names:
        labels = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)},
        }
    if quantize == "gguf":
        from ..gguf import load_gguf_model
        from .quantize import require_backend

        require_backend(quantize)
        model_class = task.auto_class() if task is not None else None
        model, info = load_gguf_model(gguf_file(name), model_class, output_loading_info=True, **labels)
        model = model.to(device)
    else:
        model, info = _load_pretrained(name, task, labels, quantize, device)
    report_load(model, info, name, quiet, adapter)
    if (
        tokenizer is not None
        and getattr(model.config, "pad_token_id", None) is None
        and tokenizer.pad_token_id is not None
    ):
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def adapter_task(adapter: str | Path) -> tuple[TaskType | None, list[str]]:
    """The task and label names the adapter folder records (`deltatune.task_record`), where its task
    model has a head of its own (classification, QA); else (None, [])."""
    from ..folder_records import recorded_task
    from ..task_record import label_names
    from .tasks import TASKS

    record = recorded_task(adapter)
    task = TASKS.get((record or {}).get("task"))
    return (task, label_names(record)) if task is not None and task.trains_head else (None, [])


def _load_pretrained(
    name: str, task: TaskType | None, labels: dict[str, Any], quantize: str | None, device: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The model and transformers' loading info (its load report held back: `load_report`)."""
    extra: dict[str, Any] = dict(labels)
    if quantize is not None:
        from .quantize import quantization_config

        extra |= {
            "quantization_config": quantization_config(quantize),
            "device_map": {"": device},
            "dtype": torch.float32,
        }
    folder = model_folder(name)
    if folder.name.endswith(GGUF_SUFFIX):  # transformers dequantizes the file to float32
        folder, extra["gguf_file"] = folder.parent, folder.name
        model_class = task.auto_class() if task is not None else _causal_lm()
    else:
        model_class = task.auto_class() if task is not None else saved_model_class(folder)
    with held_load_report():
        model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **extra)
    if quantize is not None:
        from .quantize import own_unquantized_tensors

        own_unquantized_tensors(model)
    return model, info


def _causal_lm() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def attach_adapter(model: nn.Module, adapter_config: Any, task: TaskType) -> DeltaModel:
    """`model` with the adapter `default` built from `adapter_config`; new task heads train fully (in
    place under a method that trains the base itself, `trains_base`: full fine-tuning)."""
    from ..registry import method_for

    if task.trains_head and not getattr(method_for(adapter_config), "trains_base", False):
        listed = list(adapter_config.modules_to_save or [])
        heads = [head for head in trained_heads(model) if head not in listed]
        if heads:
            adapter_config = adapter_config.replace(modules_to_save=listed + heads)
    from .. import attach

    return attach(model, adapter_config)
