"""LoRA in peft's files (peft type `LORA`): the config fields under peft's names and each adapter type's
tensor names. Adapter types are named by their dotted names, so this file imports no layer module."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from ..errors import DeltaTuneError
from ..field_check import accepts, field_types
from ..peft_format import BASE_LAYER, PeftCodec
from ..peft_keys import LORA_READ, check_init_writable, check_lora_keys
from ..site_adapter import SiteAdapter
from .base import lookup_type
from .lora_config import LoraConfig
from .lora_eva import eva_config_for_peft
from .lora_monteclora import monteclora_config_for_peft
from .lora_velora import velora_config_for_peft

MONTECLORA_TENSORS = ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")
"""A MonteCLoRA sampler's tensors, under the same names in both libraries."""


class LoraPeft(PeftCodec):
    """LoRA in peft's files: the config fields under the same names (targets, ranks and alphas as the
    resolved full module names, so peft adapts exactly these modules with the same shapes) and the
    tensors `lora_A.weight` / `lora_B.weight` (embeddings: `lora_embedding_A` / `lora_embedding_B`)."""

    peft_type = "LORA"
    tensor_names = {
        "deltatune.methods.lora.LoraAdapter": {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_B_bias": "lora_B.bias",
            "trained_bias": "base_layer.bias",
            "velora.projection": "lora_velora_embed",
            **{f"monteclora.{name}": f"lora_monteclora_sampler.{name}" for name in MONTECLORA_TENSORS},
        },
        "deltatune.methods.token_rows.TokenRows": {"rows": "token_adapter.trainable_tokens_delta"},
        "deltatune.methods.lora_bias.TrainedBias": {"bias": "bias"},
        "deltatune.methods.lora.LoraEmbedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
        "deltatune.methods.dora.DoraNorm": {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_magnitude_vector": "lora_magnitude_vector",
        },
        "deltatune.methods.lora_kasa_layer.KasaLinear": {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_diag": "lora_diag",
            "lora_B_bias": "lora_B.bias",
            "trained_bias": "base_layer.bias",
        },
        "deltatune.methods.lora_mha.LoraMultiheadAttention": {
            "factors.in_proj.lora_A": "lora_A.weight",
            "factors.in_proj.lora_B": "lora_B.weight",
            "factors.out_proj.lora_A": "base_layer.out_proj.lora_A.weight",
            "factors.out_proj.lora_B": "base_layer.out_proj.lora_B.weight",
        },
        "deltatune.methods.dora.DoraEmbedding": {
            "lora_A": "lora_embedding_A",
            "lora_B": "lora_embedding_B",
            "lora_magnitude_vector": "lora_magnitude_vector",
        },
    }

    def check_keys(self, data: dict[str, Any]) -> None:
        check_lora_keys(data)

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        """LoRA on parameters: peft nests one wrapper per parameter, the module's first parameter innermost,
        so `<parameter>.lora_A` of the k-th of n is `<module>` + `.base_layer` × (n − 1 − k) + `.lora_A.weight`."""
        from .lora_parameter import LoraParameters  # it builds on lora.py's classes

        if not isinstance(adapter, LoraParameters) or tensor_name in lookup_type(self.tensor_names, type(adapter), {}):
            return super().tensor_key(module_name, adapter, tensor_name)
        parameter, factor = tensor_name.split(".")[-2:]  # "factors.<parameter>.lora_A"
        order = list(adapter.factors)
        depth = len(order) - 1 - order.index(parameter)
        return f"{self.model_prefix}{module_name}{BASE_LAYER * depth}.{factor}.weight"

    def config_to_peft(self, config: LoraConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        from .lora_parameter import peft_targets

        wanted = set(targets)
        transposed = any(isinstance(module, Conv1D) for name, module in model.named_modules() if name in wanted)
        target_modules, target_parameters = peft_targets(config, targets, model)
        named = [*target_modules, *(target_parameters or [])]  # what peft matches its patterns against
        check_init_writable(config.init_lora_weights)
        if config.use_gating:
            raise DeltaTuneError("peft's LoRA has no gate (use_gating); save this adapter in deltatune's format")
        if any(config.slices_for(name) is not None for name in targets):
            raise DeltaTuneError(
                "peft's LoRA adapts a layer's whole output, not parts of it (fused_slices); save this adapter in "
                "deltatune's format"
            )
        return {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "use_rslora": config.use_rslora,
            "init_lora_weights": True if config.init_lora_weights == "loftq" else config.init_lora_weights,
            "target_modules": target_modules,
            "target_parameters": target_parameters,
            **({"fan_in_fan_out": True} if transposed else {}),  # as peft records it once it wraps GPT-2's Conv1D
            "rank_pattern": {re.escape(n): config.rank_for(n) for n in named if config.rank_for(n) != config.r},
            "alpha_pattern": {
                re.escape(n): config.alpha_for(n) for n in named if config.alpha_for(n) != config.lora_alpha
            },
            "bias": config.bias,
            "lora_bias": config.lora_bias,
            "trainable_token_indices": config.trainable_token_indices,
            "use_dora": config.use_dora,
            "use_bdlora": None if config.use_bdlora is None else dataclasses.asdict(config.use_bdlora),
            "kasa_config": None if config.kasa_config is None else dataclasses.asdict(config.kasa_config),
            "eva_config": eva_config_for_peft(config),
            "velora_config": velora_config_for_peft(config),
            "monteclora_config": monteclora_config_for_peft(config),
        }

    def config_from_peft(self, data: dict[str, Any]) -> LoraConfig:
        fields = {key: data[key] for key in LORA_READ if data.get(key) is not None}
        if not accepts(field_types(LoraConfig)["init_lora_weights"], fields.get("init_lora_weights", True)):
            fields["init_lora_weights"] = True  # another spelling peft takes ("Gaussian"): the weights are in the file
        return LoraConfig(**fields)
