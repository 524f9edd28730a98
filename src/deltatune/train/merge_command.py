"""`deltatune merge`: an adapter merged into its base and written as a full model folder.

Refused before anything is written: an output that is an input or holds files (without `--overwrite`), a folder
of several adapters, a packed quantized base without `--dequantize`, an adapter recorded for other base weights
(without `--allow-other-base`), a trained bias the architecture cannot load back, a `--dtype` cast that
overflows. The folder replaces OUT in one exchange (`atomic.staged_folder`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergeError

if TYPE_CHECKING:
    import torch

    from ..model import DeltaModel


DTYPES = ("float32", "float16", "bfloat16")
"""`merge --dtype` names (torch dtype names)."""
REQUANTIZE_NAMES = ("nf4", "fp4", "int8")
"""`merge --requantize` names: the `quantize:` names whose layers transformers can save (bitsandbytes)."""


def merge_command(arguments: argparse.Namespace) -> None:
    """`deltatune merge MODEL ADAPTER OUT`: a full model folder with the adapter merged in, whole or not at all."""
    import torch
    from transformers import AutoTokenizer

    from ..atomic import restore_interrupted, staged_folder
    from ..quantized import quantized_linear
    from ..requantize import save_requantized
    from ..single_adapter import single_adapter_folder
    from .models import adapter_task, load_model, model_folder
    from .outputs import check_merge_output
    from .quantize import quantization_config, require_backend

    out, folder = Path(arguments.out), model_folder(arguments.model)
    restored = restore_interrupted(out)  # before the checks: a model put back is not written over unasked
    if restored is not None:
        print(f"note: {out} was put back from {restored}, where an interrupted replacement had left it")
    check_merge_output(out, {"model": folder, "adapter": Path(arguments.adapter)}, arguments.overwrite)
    single_adapter_folder(arguments.adapter)  # before the model loads: a merge keeps only the active adapter
    dequantize = arguments.dequantize or arguments.requantize is not None
    if arguments.quantize and not dequantize:
        _refuse_packed_merge(f"--quantize {arguments.quantize} loads the base quantized")
    if arguments.requantize:
        require_backend(arguments.requantize)
    task, labels = adapter_task(arguments.adapter)  # a classifier's head and labels, from the adapter folder
    model = load_model(
        arguments.model, task, label_names=labels, quantize=arguments.quantize, adapter=arguments.adapter
    )
    quantized = next((module for module in model.modules() if quantized_linear(module) is not None), None)
    if quantized is not None and not dequantize:
        _refuse_packed_merge(f"{folder} holds a quantized model ({quantized_linear(quantized).describe(quantized)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
        print(f"note: no tokenizer in {folder}; the merged folder holds the model only")
    dtype = getattr(torch, arguments.dtype or "float32")
    own_parameters = {name for name, _ in model.named_parameters()}
    merged = _load_for_merge(model, arguments).unload(merge=True, dequantize=dequantize, dtype=dtype)
    added = sorted(  # biases only: a dequantized layer's weight is a new parameter that loads back
        name for name, _ in merged.named_parameters() if name.endswith(".bias") and name not in own_parameters
    )
    if added:
        raise MergeError(
            f"merging {arguments.adapter} gives the model parameters it did not have ({', '.join(added[:3])}"
            f"{', ...' if len(added) > 3 else ''}: a trained bias on a bias-free layer, from lora_bias or "
            "add_missing_bias), which its architecture cannot load back, so the merged folder would give other "
            "outputs: keep the adapter unmerged (deltatune.load it onto the base), or train it without that "
            "option; nothing was written"
        )
    if arguments.dtype:
        _cast_merged(merged, dtype)
    with staged_folder(out, replaced=lambda entry: True) as staging:  # the old OUT goes whole, in one exchange
        if arguments.requantize:
            save_requantized(merged, staging, quantization_config(arguments.requantize, dtype), dtype)
        else:
            merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    print(f"merged model written to {out}" + (f" ({arguments.requantize})" if arguments.requantize else ""))


def _load_for_merge(model: torch.nn.Module, arguments: argparse.Namespace) -> DeltaModel:
    """The adapter on `model`; one recorded for other base weights is refused unless `--allow-other-base`
    (merged, it would be another model under the adapter's name)."""
    from .. import load
    from ..errors import BaseWeightsError

    try:
        return load(model, arguments.adapter, strict=not arguments.allow_other_base)
    except BaseWeightsError as error:
        raise BaseWeightsError(
            str(error).replace("nothing was loaded", "nothing was written; --allow-other-base merges it anyway")
        ) from None


def _cast_merged(merged: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the merged model to `--dtype`; refuse a tensor that the cast makes non-finite (float16: |x| > 65504)."""
    import torch

    from ..adapter_tensors import non_finite

    merged.to(dtype)
    overflown = next((name for name, tensor in merged.state_dict().items() if non_finite(tensor)), None)
    if overflown is not None:
        name = str(dtype).removeprefix("torch.")
        raise MergeError(
            f"the merged {overflown} holds values beyond {name}'s range (±{torch.finfo(dtype).max:.6g}), which --dtype "
            f"{name} would write as inf: merge with --dtype float32 or bfloat16; nothing was written"
        )


def _refuse_packed_merge(reason: str) -> None:
    raise MergeError(
        f"{reason}, and a merge into its packed weights would lose most of the adapter: pass --dequantize to "
        "write a full-precision merged model (and --requantize nf4 to quantize it again); nothing was written"
    )
