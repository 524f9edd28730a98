"""CorDA, context-oriented decomposition (Yang et al. 2024, arXiv:2406.05223; peft's "corda").

The layer's input covariance over a few samples, each sample's inputs X_i (its kept positions)
divided by the magnitude of their largest entry as peft does: C = (1/N) Σ X̂_iᵀ X̂_i, damped to
C' = C + d · mean(diag C) · I with d = 0.01, doubled until ‖C' C'⁻¹ − I‖_F < 0.05. Then the SVD of the
weight times the covariance, W C' = U Σ Vᵀ, gives W = U Σ V'ᵀ with V' = C'⁻¹ V: a decomposition of W
ordered by how strongly the data excites each component. IPM ("instruction-previewed", `corda_method=
"ipm"`) starts the adapter from the r largest components, KPM ("knowledge-preserved", "kpm") from the
r smallest, leaving the components the data uses to the frozen base:

    A₀ = √(Σ_r / s) V'_rᵀ,   B₀ = U_r √(Σ_r / s),   so s B₀A₀ = U_r Σ_r V'_rᵀ.

peft rewrites W to W − s B₀A₀; here, as for PiSSA, the adapter keeps A₀, B₀ frozen and subtracts the
term itself (`lora_init.LoraResidualLinear`), and saves them (they come from data). The arithmetic is
float32, as peft's, so that the damping steps are the same. A sample is a row of a batch (peft's
preprocessing runs one sample per call); a batch without `input_ids` is one sample. peft's covariance
and cache files are not taken: the adapter's saved folder holds what they would restore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..field_check import PositiveInt, check_fields
from .lora_data_init import DEFAULT_BATCHES, Forward, gather_layer_inputs, settings_from_dict, token_mask

if TYPE_CHECKING:
    from ..model import DeltaModel

DAMPING_START = 0.01
INVERSE_ERROR = 0.05


@dataclasses.dataclass
class CordaConfig:
    """CorDA's settings; names follow peft's `CordaConfig` (see `methods/lora_corda.py` for what it lacks)."""

    corda_method: Literal["ipm", "kpm"] = "ipm"
    """"ipm": the adapter starts from the r components the data excites most; "kpm": the r least."""
    batches: PositiveInt = DEFAULT_BATCHES
    """How many batches of the training data `deltatune train` feeds CorDA (the API takes what it is given)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CordaConfig:
        note = "peft's cache and covariance files do not apply: the saved adapter holds the initial factors"
        return settings_from_dict(cls, data, "corda_config", note)

    def __post_init__(self) -> None:
        check_fields(self)


class SampleCovariance:
    """Σ X̂_iᵀ X̂_i over samples (float32) and their count, X̂_i a sample's inputs over their largest entry."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | float = 0.0

    def add(self, inputs: torch.Tensor, kept: torch.Tensor | None) -> None:
        inputs = inputs.float()
        if kept is not None:
            samples = [row[mask] for row, mask in zip(inputs, kept)]
        else:
            samples = [inputs] if inputs.dim() == 2 else list(inputs)
        for sample in samples:
            sample = sample / sample.max().abs()
            self.total = self.total + sample.t() @ sample
            self.count += 1

    def damped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C', C'⁻¹): the mean covariance with the smallest damping whose inverse is accurate."""
        covariance = self.total / self.count
        identity = torch.eye(covariance.shape[0], device=covariance.device)
        damping = DAMPING_START
        while True:
            fixed = covariance + identity * covariance.diagonal().mean() * damping
            inverse = torch.linalg.inv(fixed)
            if torch.dist(fixed @ inverse, identity).item() < INVERSE_ERROR:
                return fixed, inverse
            damping *= 2


def corda_factors(
    weight: torch.Tensor, statistics: SampleCovariance, rank: int, scaling: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of CorDA for the float32 (out, in) matrix `weight` (module docstring)."""
    fixed, inverse = statistics.damped()
    left, values, right_t = torch.linalg.svd(weight @ fixed, full_matrices=False)
    right = (right_t @ inverse).t()
    chosen = slice(0, rank) if method == "ipm" else slice(values.shape[0] - rank, values.shape[0])
    root = torch.sqrt(values[chosen] / scaling)
    return root[:, None] * right[:, chosen].t(), left[:, chosen] * root


def initialize_corda(
    delta_model: DeltaModel, batches: Iterable[Mapping[str, Any]], name: str, forward: Forward | None = None
) -> None:
    """Start CorDA adapter `name` from `batches` (`initialize_from_data`)."""
    config = delta_model.configs[name]
    settings = config.corda_config or CordaConfig()
    layers = {module_name: site.adapters[name] for module_name, site in delta_model.sites() if name in site.adapters}
    statistics = {layer: SampleCovariance() for layer in layers}
    gather_layer_inputs(delta_model, statistics, batches, token_mask, forward)
    for layer, adapter in layers.items():
        weight = delta_model.base_model.get_submodule(layer).weight.detach().float()
        matrix = weight.t() if adapter.transposed else weight
        lora_A, lora_B = corda_factors(matrix, statistics[layer], adapter.rank, adapter.scaling, settings.corda_method)
        adapter.set_initial(lora_A, lora_B)
