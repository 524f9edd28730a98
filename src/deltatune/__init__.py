"""deltatune: parameter-efficient fine-tuning for any PyTorch model.

import deltatune
model = deltatune.attach(model, deltatune.LoraConfig(r=8, target_modules="all-linear"))
...train...
model.save("my-adapter")                     # or format="peft"
model = deltatune.load(base_model, "my-adapter")
"""

from __future__ import annotations

from torch import nn

from .adapter_trainer import adapter_trainer
from .composition import Fuse, Stack
from .config import DeltaConfig, TargetedConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterShapeError,
    BaseWeightsError,
    BaseWeightsWarning,
    DeltaTuneError,
    MergeError,
    MethodNameError,
    PlacementError,
    TargetConflictError,
    TargetNotFoundError,
    TrainingDivergedError,
    UnknownMethodError,
    UnsupportedModuleError,
)
from .gated_mlp import lean_gated_mlp
from .io import load_adapters
from .losses import causal_lm_loss
from .methods.adalora import AdaLoraConfig
from .methods.adalora_budget import RankAllocator
from .methods.base import Method, ModuleMethod
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.compacter import CompacterConfig
from .methods.full import FullConfig
from .methods.fusion import FusionConfig
from .methods.ia3 import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .methods.lora_block_diagonal import BdLoraConfig
from .methods.lora_convert import to_plain_lora
from .methods.lora_corda import CordaConfig
from .methods.lora_data_init import initialize_from_data
from .methods.lora_eva import EvaConfig
from .methods.lora_kasa import KasaConfig, kasa_loss
from .methods.lora_loftq import replace_lora_weights_loftq
from .methods.lora_monteclora import MontecloraConfig, monteclora_loss
from .methods.lora_velora import VeloraConfig
from .methods.mam import MAMConfig
from .methods.oft import OFTConfig
from .methods.p_tuning import PTuningConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.reft import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from .methods.soft_prompt import collapse_soft_prompt
from .methods.trainable_tokens import TrainableTokensConfig
from .methods.unipelt import UniPELTConfig
from .methods.vera import VeraConfig
from .model import DeltaModel
from .peft_format import PeftCodec
from .peft_releases import minimum_peft_version
from .placement import Placement
from .qlora import keep_trainable_layout, prepare_quantized_base
from .registry import get_method, register, registered_methods
from .site_adapter import SiteAdapter
from .summary import TrainableSummary
from .targeting import model_modules
from .version import __version__ as __version__


def attach(
    model: nn.Module, config: DeltaConfig, name: str = "default", autocast_adapter_dtype: bool = True
) -> DeltaModel:
    """Freeze `model` and add adapter `name` built from `config`; returns the `DeltaModel`. On a float16 /
    bfloat16 model the adapter keeps float32 weights (as peft does) unless `autocast_adapter_dtype=False`."""
    delta_model = DeltaModel(model)
    keep_trainable_layout(model)
    try:
        return delta_model.add(name, config, autocast_adapter_dtype=autocast_adapter_dtype)
    except BaseException:
        delta_model.unload(merge=False)
        raise


def load(
    model: nn.Module,
    path: str,
    name: str | None = None,
    trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    strict: bool = False,
) -> DeltaModel:
    """Load an adapter folder (deltatune's or peft's, told apart by its config) onto `model`, a plain
    model or a `DeltaModel`. A folder of subfolders loads each. `trainable=True` to train it further.
    `autocast_adapter_dtype`: as in `attach` (float32 adapter weights on a half-precision model). A
    folder that records other base weights than `model`'s (`base_fingerprint`) warns; `strict=True`
    refuses it. On an error nothing is added: a plain `model` is left as it was."""
    delta_model = model if isinstance(model, DeltaModel) else DeltaModel(model)
    if trainable:
        keep_trainable_layout(delta_model.base_model)
    try:
        load_adapters(delta_model, path, name, trainable, autocast_adapter_dtype, strict)
    except BaseException:
        if delta_model is not model:
            delta_model.unload(merge=False)
        raise
    return delta_model


__all__ = [
    "AdaLoraConfig",
    "AdapterFileError",
    "AdapterNameError",
    "AdapterShapeError",
    "BitFitConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "DeltaConfig",
    "DeltaModel",
    "DeltaTuneError",
    "Fuse",
    "FullConfig",
    "FusionConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "MergeError",
    "Method",
    "MethodNameError",
    "ModuleMethod",
    "PeftCodec",
    "Placement",
    "PlacementError",
    "RankAllocator",
    "SiteAdapter",
    "Stack",
    "TargetConflictError",
    "TargetNotFoundError",
    "TrainingDivergedError",
    "TargetedConfig",
    "TrainableSummary",
    "TrainableTokensConfig",
    "UnknownMethodError",
    "UnsupportedModuleError",
    "VeraConfig",
    "ReftConfig",
    "LoReftConfig",
    "NoReftConfig",
    "DiReftConfig",
    "attach",
    "get_method",
    "lean_gated_mlp",
    "load",
    "minimum_peft_version",
    "model_modules",
    "prepare_quantized_base",
    "register",
    "registered_methods",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "collapse_soft_prompt",
    "causal_lm_loss",
    "to_plain_lora",
    "CordaConfig",
    "EvaConfig",
    "initialize_from_data",
    "replace_lora_weights_loftq",
    "BdLoraConfig",
    "KasaConfig",
    "kasa_loss",
    "VeloraConfig",
    "MontecloraConfig",
    "monteclora_loss",
    "adapter_trainer",
    "BaseWeightsError",
    "BaseWeightsWarning",
    "MAMConfig",
    "UniPELTConfig",
]
