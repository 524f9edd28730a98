"""What a `DeltaModel` does with its adapters' weights: fold them into the base (`merge`, `unmerge`),
return the plain base (`unload`), and combine LoRA adapters into a new one (`add_weighted_adapter`).
A mixin of `DeltaModel`; the arithmetic is `merging`'s and `methods.lora_combine`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .composition import ActivePlan
from .errors import DeltaTuneError
from .merging import merge_adapters, merge_dequantized, unmerge_adapters
from .quantized import is_quantized
from .requantize import dequantize_model

if TYPE_CHECKING:
    from .model import DeltaModel


class Merging:
    """`DeltaModel`'s merge, unmerge, unload and add_weighted_adapter."""

    def add_weighted_adapter(
        self: DeltaModel,
        adapters: list[str],
        weights: list[float],
        name: str,
        combination_type: str = "cat",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> DeltaModel:
        """New LoRA adapter `name` combining `adapters` with `weights` as peft's method of that name does
        (cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune and their _svd forms); see
        `lora_combine`."""
        from .methods.lora_combine import SvdSettings, add_weighted_adapter

        svd = SvdSettings(svd_rank, svd_clamp, svd_full_matrices, svd_driver)
        add_weighted_adapter(self, adapters, weights, name, combination_type, svd, density, majority_sign_method)
        return self

    def merge(self: DeltaModel, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, in float32."""
        names = list(self.active_adapters if names is None else names)
        self.require(names)
        merge_adapters(self.base_model, self.sites(), names)
        self._reactivate(self.active_adapters)

    def unmerge(self: DeltaModel) -> None:
        """Take every merged adapter back out of the base weights."""
        unmerge_adapters(self.base_model, self.sites())
        self._reactivate(self.active_adapters)

    def unload(
        self: DeltaModel, merge: bool = True, dequantize: bool = False, dtype: torch.dtype = torch.float32
    ) -> nn.Module:
        """Remove all adapters and return the plain base model (with the active adapters merged in if
        `merge`). `requires_grad` flags are restored as they were before attach.

        A merge cannot go into quantized weights: `dequantize=True` makes each adapted quantized layer a
        plain `nn.Linear` holding its dequantized weight plus ΔW (added in float32), then dequantizes the
        rest (`requantize.dequantize_model`), all in `dtype`: a plain full-precision checkpoint."""
        if not merge:
            self._refuse_without_base("unload(merge=False)", "use unload() for the tuned model")
        plain: dict[str, nn.Linear] = {}
        if merge and self.active_adapters:
            if dequantize:
                plain = merge_dequantized(self.base_model, self.sites(), list(self.active_adapters))
            else:
                merge_adapters(self.base_model, self.sites(), list(self.active_adapters))
        else:
            unmerge_adapters(self.base_model, self.sites())
        failure: DeltaTuneError | None = None
        for name in list(self.records):
            try:
                self._remove(name)
            except DeltaTuneError as error:
                failure = failure or error
        for module_name, module in plain.items():
            parent_name, _, leaf = module_name.rpartition(".")
            self.base_model.get_submodule(parent_name).register_module(leaf, module.to(dtype))
        self.active_adapters = ()
        self.plan = ActivePlan((), [])
        self._call_enders = []
        for parameter_name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad.get(parameter_name, False))
        if failure is not None:
            raise failure
        if dequantize and any(is_quantized(module) for module in self.base_model.modules()):
            dequantize_model(self.base_model, dtype)
        return self.base_model
