"""KaSA, knowledge-aware singular-value adaptation (Wang et al. 2024, arXiv:2412.06071; peft's `kasa_config`):
its settings, the base truncation and the paper's regularizer. The layer is `lora_kasa_layer.KasaLinear`.

KaSA drops the r smallest singular components of the frozen weight, W = U Σ Vᵀ with k = min(out, in):

    W_kept = U_{:k−r} Σ_{:k−r} V_{:k−r}ᵀ = W − D,   D = U_{k−r:} Σ_{k−r:} V_{k−r:}ᵀ  (the dropped part),

and learns the update in SVD form with a trained diagonal ΔΣ (`lora_diag`, r values, drawn N(0, 1)):

    y = W_kept x + s·B diag(ΔΣ) A dropout(x),   ΔW = s·B diag(ΔΣ) A − D.

peft overwrites W by W_kept; deltatune keeps W and subtracts D x in the forward (its factors are frozen
buffers, recomputed from W when a folder loads, as peft recomputes W_kept), so disabling or unloading the
adapter gives the original base back. Training: the paper adds β‖ΔΣ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)
to the task loss (`kasa_loss`, peft's `_get_kasa_loss`), which keeps B and A near semi-orthogonal;
`deltatune train` adds it (a step hook, `regularizer_hook`), a user's own loop adds it by hand.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DeltaTuneError
from ..field_check import NonNegativeFloat, check_fields
from .lora_data_init import settings_from_dict

if TYPE_CHECKING:
    from ..model import DeltaModel
    from .lora import LoraConfig


@dataclasses.dataclass
class KasaConfig:
    """KaSA's settings; names and defaults follow peft's `KasaConfig`. They weigh the regularizer only
    (`kasa_loss`); the layer's math is set by r alone."""

    beta: NonNegativeFloat = 1e-4
    """β, the weight of ‖ΔΣ‖² = Σ lora_diag² in `kasa_loss`."""
    gamma: NonNegativeFloat = 1e-3
    """γ, the weight of ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F in `kasa_loss`."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KasaConfig:
        return settings_from_dict(cls, data, "kasa_config", "KaSA's regularizer weights")

    def __post_init__(self) -> None:
        check_fields(self)


def check_kasa_options(config: LoraConfig) -> None:
    """KaSA runs on plain LoRA's start (random or zero B, "gaussian" A), without DoRA or bare parameters."""
    if config.kasa_config is None:
        return
    init = config.init_lora_weights
    if config.use_dora or config.target_parameters or (isinstance(init, str) and init != "gaussian"):
        raise DeltaTuneError(
            f"kasa_config does not combine with use_dora, target_parameters or init_lora_weights={init!r} "
            "(peft refuses these too): keep init_lora_weights True, False or 'gaussian' and drop the others"
        )


def dropped_part(weight: torch.Tensor, rank: int, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_dropᵀ, U_drop Σ_drop): the r smallest singular components of the float32 (out, in) `weight`,
    so that D = U_drop Σ_drop V_dropᵀ is what KaSA takes out of it."""
    kept = min(weight.shape) - rank
    if kept < 1:
        raise DeltaTuneError(
            f"KaSA needs r below min(out, in) = {min(weight.shape)} at {module_name} (at least one singular "
            f"component must stay), got r={rank}; lower r (or its rank_pattern entry)"
        )
    left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
    return right_t[kept:].contiguous(), left[:, kept:] * values[kept:]


def kasa_loss(delta_model: DeltaModel, name: str | None = None) -> torch.Tensor:
    """β Σ ΔΣ² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), summed over adapter `name`'s KaSA layers (default: the
    active adapters), each with its adapter's β and γ; float32, 0 without KaSA layers. Add it to the loss."""
    from .lora_kasa_layer import KasaLinear

    names = [name] if name is not None else list(delta_model.active_adapters)
    terms = [
        site.adapters[adapter_name].regularizer(delta_model.configs[adapter_name].kasa_config)
        for _, site in delta_model.sites()
        for adapter_name in names
        if adapter_name in site.adapters and isinstance(site.adapters[adapter_name], KasaLinear)
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())
