"""Reading adapter folders saved by AdapterHub (`adapters`, `save_adapter` / `save_adapter_fusion`).

An adapter folder holds `adapter_config.json` ({"config": {...}, "name", "model_type", "hidden_size",
"version"}) and `adapter.safetensors` or `pytorch_adapter.bin` (read with `torch.load(weights_only=True)`,
which refuses anything but tensors). Keys look like
`bert.encoder.layer.0.attention.output.adapters.NAME.adapter_down.0.weight`: the block, AdapterHub's
location in it (`LOCATIONS`), the adapter and the tensor. A fusion folder holds
`adapter_fusion_config.json` ({"adapter_names", "config", "name"}) and `model_adapter_fusion.safetensors`
or `pytorch_model_adapter_fusion.bin` with keys `<block>.<location>.adapter_fusion_layer.NAME.query.weight`.

Bottleneck (`double_seq_bn`, `seq_bn`, `par_bn` and their fields), Compacter (`phm_layer`), ReFT
(`adapterhub_reft`, which also writes them) and dynamic fusion configs translate to ours; options we do
not implement (new layer norms, gating, invertible adapters, learned scaling, ...) are refused with the
option's name, never silently dropped. Prediction heads saved beside the adapter (`head_config.json`)
are not read. Every name a folder records (the adapter's, a fusion's and the fused adapters') must
follow the rule of `names`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapterhub_reft
from .architectures import sublayer_sites
from .config import DeltaConfig
from .errors import AdapterFileError
from .files import read_json, read_pickled_tensors, read_tensors
from .methods.bottleneck import BottleneckConfig, placed_sites
from .methods.compacter import CompacterConfig
from .methods.fusion import FusionConfig
from .names import check_name

ADAPTER_CONFIG = "adapter_config.json"
FUSION_CONFIG = "adapter_fusion_config.json"
ADAPTER_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
LOCATIONS = {
    "attention.output": "attention",
    "attention_adapters": "attention",
    "output": "ffn",
    "output_adapters": "ffn",
}
INITS = {"bert": "bert", "houlsby": "near_identity", "mam_adapter": "zero_up"}
TENSOR_NAMES = {"adapter_down.0.": "down.", "adapter_up.": "up."}

# AdapterHub option: the value our adapters implement (anything else is refused).
FIXED_OPTIONS = {
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "residual_before_ln": True,
    "original_ln_after": True,
    "inv_adapter": None,
    "cross_adapter": False,
    "stochastic_depth": 0.0,
    "shared_W_phm": False,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "phm_bias": True,
    "shared_phm_rule": True,
}
FIXED_FUSION_OPTIONS = {
    "key": True,
    "query": True,
    "value": True,
    "query_before_ln": False,
    "residual_before": False,
    "temperature": False,
    "value_before_softmax": True,
}


def is_adapterhub_folder(folder: Path) -> bool:
    """Whether `folder` was written by AdapterHub (an adapter or a fusion)."""
    if (folder / FUSION_CONFIG).is_file():
        return True
    try:
        data = read_json(folder / ADAPTER_CONFIG)
    except AdapterFileError:
        return False
    return (
        isinstance(data.get("config"), dict)
        and "format" not in data
        and "peft_type" not in data
        and "model_type" in data
    )


def is_fusion_folder(folder: Path) -> bool:
    return (folder / FUSION_CONFIG).is_file()


def describe(folder: Path) -> tuple[str, dict[str, Any], Path | None]:
    """(method, AdapterHub's config, weights file) of an AdapterHub folder, read without a model."""
    if is_fusion_folder(folder):
        data = read_json(folder / FUSION_CONFIG)
        return (
            "fusion",
            {**data["config"], "adapter_names": data["adapter_names"]},
            _weights_file(folder, FUSION_WEIGHTS),
        )
    options = read_json(folder / ADAPTER_CONFIG)["config"]
    method = "compacter" if options.get("phm_layer") else options.get("architecture") or "bottleneck"
    return method, options, _weights_file(folder, ADAPTER_WEIGHTS)


def read_folder(folder: Path, model: nn.Module) -> tuple[DeltaConfig, dict[str, torch.Tensor], str]:
    """(our config, tensors under our file keys, the adapter's name) for an AdapterHub folder."""
    if is_fusion_folder(folder):
        return _read_fusion(folder, model)
    data = read_json(folder / ADAPTER_CONFIG)
    name = check_name(data.get("name") or folder.name, f"{folder / ADAPTER_CONFIG}", AdapterFileError)
    tensors = _read_weights(folder, ADAPTER_WEIGHTS)
    if data["config"].get("architecture") == "reft":
        reft_config = adapterhub_reft.config_from_adapterhub(data["config"], folder)
        return reft_config, adapterhub_reft.read_tensors(tensors, name, model, folder), name
    config = config_from_adapterhub(data["config"], folder)
    sites = placed_sites(model, config)
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if f"shared_parameters.{name}." in key:
            ours[f"{sites[0].output}.down.{key.rsplit('.', 1)[-1]}"] = tensor
            continue
        marker = f".adapters.{name}."
        if marker not in key:
            raise AdapterFileError(
                f"{folder}: tensor {key!r} is not part of a bottleneck adapter {name!r} that deltatune can load"
            )
        prefix, tensor_name = key.split(marker)
        ours[f"{_site_output(prefix, sites, folder)}.{_our_tensor_name(tensor_name)}"] = tensor
    return config, ours, name


def config_from_adapterhub(options: dict[str, Any], folder: Path) -> BottleneckConfig:
    """Our `BottleneckConfig` / `CompacterConfig` for an AdapterHub bottleneck config dict."""
    if options.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise AdapterFileError(
            f"{folder}: AdapterHub method {options['architecture']!r} is not a bottleneck adapter; deltatune reads "
            "bottleneck, Compacter and fusion folders"
        )
    _refuse_other_values(options, FIXED_OPTIONS, folder)
    if not isinstance(options.get("scaling", 1.0), (int, float)) or not isinstance(
        options["reduction_factor"], (int, float)
    ):
        raise AdapterFileError(
            f"{folder}: scaling and reduction_factor must be numbers here (got {options.get('scaling')!r}, "
            f"{options['reduction_factor']!r})"
        )
    fields = dict(
        preset="parallel"
        if options.get("is_parallel")
        else "pfeiffer"
        if options.get("original_ln_before")
        else "houlsby",
        attention_adapter=options["mh_adapter"],
        ffn_adapter=options["output_adapter"],
        parallel=options.get("is_parallel", False),
        original_ln_before=options.get("original_ln_before", False),
        reduction_factor=options["reduction_factor"],
        non_linearity=options["non_linearity"],
        scaling=float(options.get("scaling", 1.0)),
        init_weights=INITS.get(options.get("init_weights", "bert"), "bert"),
        dropout=options.get("dropout", 0.0),
        leave_out=list(options.get("leave_out") or []),
    )
    if options.get("phm_layer"):
        return CompacterConfig(
            **fields, phm_dim=options["phm_dim"], phm_rank=options["phm_rank"], phm_init_range=options["phm_init_range"]
        )
    return BottleneckConfig(**fields)


def _read_fusion(folder: Path, model: nn.Module) -> tuple[FusionConfig, dict[str, torch.Tensor], str]:
    data = read_json(folder / FUSION_CONFIG)
    _refuse_other_values(data["config"], FIXED_FUSION_OPTIONS, folder)
    for adapter in data["adapter_names"]:
        check_name(adapter, f"{folder / FUSION_CONFIG}", AdapterFileError)
    name = check_name(
        data.get("name") or ",".join(data["adapter_names"]), f"{folder / FUSION_CONFIG}", AdapterFileError
    )
    dropout = data["config"].get("dropout_prob")
    if dropout is None:
        dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0)
    sites = sublayer_sites(model)
    marker = f".adapter_fusion_layer.{name}."
    ours = {}
    for key, tensor in _read_weights(folder, FUSION_WEIGHTS).items():
        if marker not in key:
            raise AdapterFileError(f"{folder}: tensor {key!r} does not belong to fusion {name!r}")
        prefix, tensor_name = key.split(marker)
        ours[f"{_site_output(prefix, sites, folder)}.{tensor_name}"] = tensor
    return FusionConfig(adapters=list(data["adapter_names"]), dropout=float(dropout)), ours, name


def _refuse_other_values(options: dict[str, Any], fixed: dict[str, Any], folder: Path) -> None:
    for option, value in fixed.items():
        if option in options and options[option] != value:
            raise AdapterFileError(
                f"{folder}: AdapterHub option {option}={options[option]!r} is not supported (deltatune implements "
                f"{option}={value!r})"
            )


def _site_output(prefix: str, sites: list[Any], folder: Path) -> str:
    """Our output module for an AdapterHub module path: the same block (its name, or the end of it)
    and a location of the same kind."""
    best: tuple[int, str] | None = None
    for site in sites:
        parts = site.block.split(".")
        for start in range(len(parts)):
            block = ".".join(parts[start:])
            if prefix.startswith(block + ".") and LOCATIONS.get(prefix[len(block) + 1 :]) == site.kind:
                if best is None or len(block) > best[0]:
                    best = (len(block), site.output)
                break
    if best is None:
        raise AdapterFileError(
            f"{folder}: no place in this model for AdapterHub module {prefix!r}; was the adapter saved for another "
            "architecture?"
        )
    return best[1]


def _our_tensor_name(name: str) -> str:
    for theirs, ours in TENSOR_NAMES.items():
        if name.startswith(theirs):
            name = ours + name[len(theirs) :]
    return name[:-2] + ".bias" if name.endswith(".b") else name


def _read_weights(folder: Path, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    weights = _weights_file(folder, names)
    if weights is None:
        raise AdapterFileError(f"{folder} has neither {names[0]} nor {names[1]}; copy the complete AdapterHub folder")
    return read_tensors(weights) if weights.name == names[0] else read_pickled_tensors(weights)


def _weights_file(folder: Path, names: tuple[str, str]) -> Path | None:
    """The folder's weights file: safetensors if it has one, else the pickle; None without either."""
    return next((folder / name for name in names if (folder / name).is_file()), None)
