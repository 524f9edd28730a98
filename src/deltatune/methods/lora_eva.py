"""EVA, LoRA's data-driven initialisation (Paischer et al. 2024, arXiv:2410.07170; peft's "eva").

For each adapted Linear / Conv1D layer, the inputs x it sees on a few batches (the positions that the
attention mask keeps, and, with `use_label_mask`, whose label is not `label_mask_value`), centred:
C = Σ (x − μ)(x − μ)ᵀ. Its top eigenvectors (the right-singular vectors of the centred inputs) are the
directions that explain most of the layer's input variance; A starts as the first r of them (as rows)
and B at 0, so the model starts at the base and the base stays as it is. The ranks are then
redistributed: the budget Σ r_l goes to the components with the largest explained-variance ratios
λ_i / tr C over all layers, at most round(r_l · rho) per layer; a layer that gets none loses its
adapter, and with `adjust_scaling_factors` lora_alpha follows the rank (α_l · r_new / r_l), as in peft.

peft estimates the components with an incremental, randomized PCA (`IncrementalPCA`, `svd_lowrank`),
cycling the batches until consecutive estimates agree to a cosine of `tau`. Here C is accumulated
exactly in float64 over the batches given, once each, and decomposed with `eigh`: the value peft's
iteration approaches (cycling the same batches leaves their mean and covariance unchanged), with no
convergence threshold. Signs follow peft's rule (the entry of largest magnitude of each component is
positive). Layers whose inputs are the same tensor (q, k and v) have equal ratios: ties go to the
layers in module order (peft breaks them by its own sort). peft's `whiten` is not implemented.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DeltaTuneError
from ..field_check import PositiveInt, check_fields
from .lora_data_init import DEFAULT_BATCHES, Forward, gather_layer_inputs, settings_from_dict, token_mask

if TYPE_CHECKING:
    from ..model import DeltaModel


@dataclasses.dataclass
class EvaConfig:
    """EVA's settings; names and defaults follow peft's `EvaConfig` (without `tau` and `whiten`, see
    `methods/lora_eva.py`)."""

    rho: float = 2.0
    """A layer's rank may grow to round(r · rho) in the redistribution (1: no redistribution); ≥ 1."""
    use_label_mask: bool = True
    """Leave out the positions whose label is `label_mask_value` (prompt and padding tokens)."""
    label_mask_value: int = -100
    """The label of the positions `use_label_mask` leaves out."""
    adjust_scaling_factors: bool = True
    """Scale lora_alpha with the redistributed rank, so every layer's update keeps its scale."""
    batches: PositiveInt = DEFAULT_BATCHES
    """How many batches of the training data `deltatune train` feeds EVA (the API takes what it is given)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaConfig:
        return settings_from_dict(
            cls, data, "eva_config", "peft's tau and whiten do not apply: see deltatune's EVA notes"
        )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.rho < 1:
            raise DeltaTuneError(f"eva_config needs rho ≥ 1 (1: no redistribution), got rho={self.rho}")


def eva_config_for_peft(config: Any) -> dict[str, Any] | None:
    """The `eva_config` of peft's adapter_config.json for LoraConfig `config` (its fields peft has)."""
    if config.init_lora_weights != "eva":
        return None
    settings = dataclasses.asdict(config.eva_config or EvaConfig())
    settings.pop("batches")
    return settings


class InputStatistics:
    """Count, sum and Gram matrix (float64) of the kept rows of a layer's inputs."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor, kept: torch.Tensor | None) -> None:
        rows = (inputs[kept] if kept is not None else inputs.reshape(-1, inputs.shape[-1])).to(torch.float64)
        if self.gram is None:
            self.total, self.gram = rows.new_zeros(rows.shape[1]), rows.new_zeros(rows.shape[1], rows.shape[1])
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.gram += rows.t() @ rows

    def components(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the top `count` eigenvectors of the centred scatter, as rows; all explained-variance ratios)."""
        if self.gram is None or self.count < 2:
            raise DeltaTuneError("EVA saw fewer than 2 input positions at a layer; give it more (or longer) batches")
        mean = self.total / self.count
        scatter = self.gram - self.count * torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(scatter)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)[:, :count].t()
        largest = vectors.abs().argmax(dim=1)
        vectors = vectors * torch.sign(vectors[torch.arange(vectors.shape[0]), largest])[:, None]
        return vectors, values / scatter.diagonal().sum()


def rank_distribution(ratios: dict[str, torch.Tensor], ranks: dict[str, int], rho: float) -> dict[str, int]:
    """{layer: new rank}: the Σ ranks largest ratios over all layers, at most round(r · rho) each; ties in
    layer order."""
    candidates = [
        (-float(ratio), order, layer)
        for order, layer in enumerate(ratios)
        for ratio in ratios[layer][: round(ranks[layer] * rho)]
    ]
    chosen = sorted(candidates)[: sum(ranks.values())]
    counts = dict.fromkeys(ratios, 0)
    for _, _, layer in chosen:
        counts[layer] += 1
    return counts


def initialize_eva(
    delta_model: DeltaModel, batches: Iterable[Mapping[str, Any]], name: str, forward: Forward | None = None
) -> None:
    """Start EVA adapter `name` from `batches` (`initialize_from_data`): A from the layer inputs'
    principal directions, ranks redistributed, B = 0 (module docstring). The adapter is built again
    with the new ranks; its trainable flag and the active set stay."""
    from .lora_init import FAMILY_LAYERS

    config = delta_model.configs[name]
    settings = config.eva_config or EvaConfig()
    layers = [
        module_name
        for module_name in delta_model.targets[name]
        if type(delta_model.base_model.get_submodule(module_name)) in FAMILY_LAYERS["eva"]
    ]
    statistics = {layer: InputStatistics() for layer in layers}
    label_mask = settings.label_mask_value if settings.use_label_mask else None
    gather_layer_inputs(delta_model, statistics, batches, lambda batch: token_mask(batch, label_mask), forward)
    ranks = {layer: config.rank_for(layer) for layer in layers}
    found = {layer: statistics[layer].components(round(ranks[layer] * settings.rho)) for layer in layers}
    new_ranks = rank_distribution({layer: ratios for layer, (_, ratios) in found.items()}, ranks, settings.rho)
    _rebuild(delta_model, name, config, new_ranks, {layer: vectors for layer, (vectors, _) in found.items()})


def _rebuild(
    delta_model: DeltaModel, name: str, config: Any, new_ranks: dict[str, int], vectors: dict[str, torch.Tensor]
) -> None:
    """Adapter `name` again with the new ranks (layers at rank 0 dropped), A set to the components."""
    adjust = (config.eva_config or EvaConfig()).adjust_scaling_factors
    kept = [layer for layer in delta_model.targets[name] if new_ranks.get(layer, 1) > 0]
    ranks = {layer: new_ranks.get(layer, config.rank_for(layer)) for layer in kept}
    alphas = {
        layer: config.alpha_for(layer) * (ranks[layer] / config.rank_for(layer) if adjust else 1) for layer in kept
    }
    new_config = config.replace(
        target_modules=kept,
        rank_pattern={re.escape(layer): rank for layer, rank in ranks.items() if rank != config.r},
        alpha_pattern={re.escape(layer): alpha for layer, alpha in alphas.items() if alpha != config.lora_alpha},
    )
    trainable = any(parameter.requires_grad for parameter in delta_model.adapter_parameters(name))
    active = delta_model.active_adapters
    delta_model.delete(name)
    delta_model.add(name, new_config, trainable=trainable)
    with torch.no_grad():
        for module_name, site in delta_model.sites():
            if name in site.adapters and module_name in vectors:
                lora_A = site.adapters[name].lora_A
                lora_A.copy_(vectors[module_name][: lora_A.shape[0]].to(lora_A.dtype))
    delta_model.activate(*active)
