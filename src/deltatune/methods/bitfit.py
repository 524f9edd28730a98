"""BitFit: train only the bias terms (Ben Zaken et al. 2022, arXiv:2106.10199).

    y = W x + (b + Δb)        Δb starts at zero; only Δb trains

The bias is trained as a separate delta, so several BitFit adapters can live on one model, the base
stays bit-identical, `disabled()` gives the base back, and merging writes b + Δb into the bias.
Modules without a bias (Llama, T5) get a new one only when `add_missing_bias=True`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..config import TargetedConfig
from ..errors import TargetNotFoundError
from ..registry import register
from ..site_adapter import SiteAdapter
from ..targeting import linear_types, model_modules
from .base import ModuleMethod, lookup_type


@dataclasses.dataclass
class BitFitConfig(TargetedConfig):
    """BitFit settings. `target_modules=None` means every module that has a bias."""

    add_missing_bias: bool = False
    """Give selected modules that have no bias a new trainable one (zero at start)."""


def _channels_first(module: nn.Module) -> tuple[int, int]:
    return module.out_channels, 1


def _last_axis(module: nn.Module) -> tuple[int, int]:
    # nn.Linear: weight out × in; transformers' Conv1D: in × out; LayerNorm: the normalised features.
    features = {nn.Linear: lambda m: m.out_features, nn.LayerNorm: lambda m: m.normalized_shape[-1]}
    return lookup_type(features, type(module), default=lambda m: m.weight.shape[-1])(module), -1


FEATURE_AXIS: dict[type, Callable[[nn.Module], tuple[int, int]]] = {
    **dict.fromkeys((*linear_types(), nn.LayerNorm), _last_axis),
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _channels_first),
}


class BiasDelta(SiteAdapter):
    """Δb added to a module's output along its feature axis (last dim, or dim 1 for convolutions)."""

    delta_reads_module = False

    def __init__(self, module: nn.Module, module_name: str, config: BitFitConfig) -> None:
        super().__init__()
        features, self.feature_axis = lookup_type(FEATURE_AXIS, type(module))(module)
        weight = module.weight  # a quantized layer's is packed integers: its Δb is float32
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.bias = nn.Parameter(torch.zeros(features, dtype=dtype, device=weight.device))

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(output.dtype)
        if self.feature_axis == 1:
            bias = bias.view(-1, *([1] * (output.dim() - 2)))
        return output + bias

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"bias": self.bias.detach().float()}


@register("bitfit")
class BitFit(ModuleMethod):
    """Train the biases of the selected modules (all modules with a bias by default)."""

    config_class = BitFitConfig
    adapter_types = dict.fromkeys(FEATURE_AXIS, BiasDelta)

    def default_targets(self, model: nn.Module) -> list[str]:
        kinds = self.supported_types()
        return [name for name, module in model_modules(model) if name and isinstance(module, kinds)]

    def select(self, model: nn.Module, config: BitFitConfig) -> list[str]:
        names = super().select(model, config)
        without_bias = [name for name in names if model.get_submodule(name).bias is None]
        if config.add_missing_bias or not without_bias:
            return names
        if config.target_modules is not None:
            raise TargetNotFoundError(
                f"{without_bias[0]!r} has no bias to train; set add_missing_bias=True to give it one, "
                "or leave it out of target_modules"
            )
        with_bias = [name for name in names if name not in without_bias]
        if not with_bias:
            raise TargetNotFoundError(
                "no selected module has a bias (models such as Llama and T5 have none); set "
                "add_missing_bias=True to train new biases on them"
            )
        return with_bias
