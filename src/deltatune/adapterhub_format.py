"""Reading adapter folders saved by AdapterHub (`adapters`, `save_adapter` / `save_adapter_fusion`).

An adapter folder holds `adapter_config.json` ({"config": {...}, "name", "model_type", "hidden_size",
"version"}) and `adapter.safetensors` or `pytorch_adapter.bin` (read with `torch.load(weights_only=True)`,
which refuses anything but tensors). Keys look like
`bert.encoder.layer.0.attention.output.adapters.NAME.adapter_down.0.weight`: the block, AdapterHub's
location in it (`LOCATIONS`; on T5, whose sublayers are modules of their own, that sublayer:
`encoder.block.0.layer.1`, the encoder's feed-forward), the adapter and the tensor. A fusion folder holds
`adapter_fusion_config.json` ({"adapter_names", "config", "name"}) and `model_adapter_fusion.safetensors`
or `pytorch_model_adapter_fusion.bin` with keys `<block>.<location>.adapter_fusion_layer.NAME.query.weight`.

Bottleneck (`double_seq_bn`, `seq_bn`, `par_bn` and their fields), Compacter (`phm_layer`), dynamic
fusion configs, ReFT (`adapterhub_reft`) and the union of a prefix tuning and a bottleneck config
(`MAMConfig`: one `adapter_config.json` whose config is {"architecture": "union", "configs": [...]}, see
`adapterhub_prefix`) translate to ours; options we do not implement (new layer norms, invertible
adapters, learned scaling, ...) are refused with the option's name, never silently dropped. Prediction
heads saved beside the adapter (`head_config.json`) are not read. Every name a folder records (the
adapter's, a fusion's and the fused adapters') must follow the rule of `names`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapterhub_reft
from .adapterhub_lora import is_lora_key, lora_config_from_adapterhub, lora_tensors
from .adapterhub_prefix import is_prefix_key, prefix_config_from_adapterhub, prefix_tensors
from .architectures import sublayer_sites
from .config import DeltaConfig
from .errors import AdapterFileError
from .files import read_json, read_pickled_tensors, read_tensors
from .methods.bottleneck import BottleneckConfig, placed_sites
from .methods.compacter import CompacterConfig
from .methods.fusion import FusionConfig
from .methods.mam import MAMConfig
from .methods.unipelt import UniPELTConfig
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
    method = options.get("architecture") or "bottleneck"
    if method == "union":
        method = "mam" if len(options.get("configs", [])) == 2 else "unipelt"
    method = "compacter" if options.get("phm_layer") else method
    return method, options, _weights_file(folder, ADAPTER_WEIGHTS)


def read_folder(folder: Path, model: nn.Module) -> tuple[DeltaConfig, dict[str, torch.Tensor], str]:
    """(our config, tensors under our file keys, the adapter's name) for an AdapterHub folder."""
    if is_fusion_folder(folder):
        return _read_fusion(folder, model)
    data = read_json(folder / ADAPTER_CONFIG)
    name = check_name(data.get("name") or folder.name, f"{folder / ADAPTER_CONFIG}", AdapterFileError)
    tensors = _read_weights(folder, ADAPTER_WEIGHTS)
    reader = READERS.get(data["config"].get("architecture"), _read_bottleneck)
    config, ours = reader(data["config"], tensors, name, model, folder)
    return config, ours, name


Tensors = dict[str, torch.Tensor]


def _read_bottleneck(options: dict, tensors: Tensors, name: str, model: nn.Module, folder: Path) -> tuple:
    config = config_from_adapterhub(options, folder)
    return config, bottleneck_tensors(tensors, name, placed_sites(model, config), folder)


def _read_lora(options: dict, tensors: Tensors, name: str, model: nn.Module, folder: Path) -> tuple:
    return lora_config_from_adapterhub(options, model, folder), lora_tensors(tensors, name, folder)


def _read_prefix(options: dict, tensors: Tensors, name: str, model: nn.Module, folder: Path) -> tuple:
    config = prefix_config_from_adapterhub(options, folder)
    return config, prefix_tensors(tensors, name, model, config, folder)


def _read_reft(options: dict, tensors: Tensors, name: str, model: nn.Module, folder: Path) -> tuple:
    return adapterhub_reft.config_from_adapterhub(options, folder), adapterhub_reft.read_tensors(
        tensors, name, model, folder
    )


def _read_union(options: dict, tensors: Tensors, name: str, model: nn.Module, folder: Path) -> tuple:
    """MAM (prefix tuning + a bottleneck) or UniPELT (the two + LoRA): each part read by its own reader,
    the prefix and LoRA from their own tensors (`PART_KEYS`), the bottleneck from the rest."""
    parts = {part.get("architecture") or "bottleneck": part for part in options.get("configs", [])}
    composed = UNIONS.get(tuple(sorted(parts)))
    if composed is None or len(options["configs"]) != len(parts) or parts["bottleneck"].get("phm_layer"):
        raise AdapterFileError(
            f"{folder}: AdapterHub union of {[part.get('architecture') for part in options.get('configs', [])]}; "
            "deltatune reads the unions of prefix tuning and a bottleneck adapter (MAM), and of those and LoRA "
            "(UniPELT)"
        )
    config_class, fields = composed
    rest = {key: tensor for key, tensor in tensors.items() if not any(own(key, name) for own in PART_KEYS.values())}
    configs, ours = {}, {}
    for architecture, field in fields.items():
        own = PART_KEYS.get(architecture)
        part_tensors = rest if own is None else {key: tensor for key, tensor in tensors.items() if own(key, name)}
        configs[field], read = READERS[architecture](parts[architecture], part_tensors, name, model, folder)
        ours.update(read)
    return config_class(**configs), ours


READERS = {
    "bottleneck": _read_bottleneck,
    "lora": _read_lora,
    "prefix_tuning": _read_prefix,
    "reft": _read_reft,
    "union": _read_union,
}
"""AdapterHub's `architecture` → (our config, our tensors) of such an adapter (none: a bottleneck adapter)."""
UNIONS = {
    ("bottleneck", "prefix_tuning"): (MAMConfig, {"prefix_tuning": "prefix_tuning", "bottleneck": "adapter"}),
    ("bottleneck", "lora", "prefix_tuning"): (
        UniPELTConfig,
        {"prefix_tuning": "prefix_tuning", "bottleneck": "adapter", "lora": "lora"},
    ),
}
"""The parts of a union AdapterHub folder (sorted) → our composed config and its field of each part."""
PART_KEYS = {"prefix_tuning": is_prefix_key, "lora": is_lora_key}
"""A union's part → whether a key of the weights (and adapter name) is that part's; the bottleneck has the rest."""


def bottleneck_tensors(
    tensors: dict[str, torch.Tensor], name: str, sites: list[Any], folder: Path
) -> dict[str, torch.Tensor]:
    """Our file keys for the bottleneck (or Compacter) tensors of adapter `name` in AdapterHub's weights."""
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
    return ours


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
        use_gating=bool(options.get("use_gating", False)),
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


def sublayer_module(site: Any) -> str:
    """The module, relative to its block, that holds a site's output module: where AdapterHub keeps the
    adapters of a model whose sublayers are modules of their own (T5's `layer.1` for `layer.1.dropout`)."""
    return site.output[len(site.block) + 1 :].rpartition(".")[0]


def _site_output(prefix: str, sites: list[Any], folder: Path) -> str:
    """Our output module for an AdapterHub module path: the same block (its name, or the end of it)
    and a location of the same kind, or the sublayer module holding our output (`sublayer_module`)."""
    best: tuple[int, str] | None = None
    for site in sites:
        parts = site.block.split(".")
        for start in range(len(parts)):
            block = ".".join(parts[start:])
            location = prefix[len(block) + 1 :]
            if prefix.startswith(block + ".") and (
                LOCATIONS.get(location) == site.kind or location == sublayer_module(site)
            ):
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
