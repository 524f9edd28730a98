"""KaSA's layer (`lora_kasa` has the math): LoRA on `nn.Linear` with the trained diagonal ΔΣ between A
and B, and the dropped part D of W subtracted as a frozen residual term (`lora_init.LoraResidualLinear`):

    y = W x − D x + s·B (ΔΣ ⊙ A dropout(x))      D = U_drop Σ_drop V_dropᵀ, kept as V_dropᵀ and U_drop Σ_drop

A with its rows scaled by ΔΣ is the down projection, so dropout, mixed batches and ΔW = s·B diag(ΔΣ) A − D
follow plain LoRA's code. Saved: lora_A, lora_B and lora_diag (peft's names); D is recomputed from W.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .lora import LoraAdapter, LoraConfig, LoraLinear
from .lora_init import LoraResidualLinear
from .lora_kasa import KasaConfig, dropped_part


class KasaLinear(LoraResidualLinear):
    """KaSA on `nn.Linear`: A, B as plain LoRA starts them, ΔΣ ~ N(0, 1), D from W's SVD (module docstring)."""

    def __init__(self, module: nn.Linear, module_name: str, config: LoraConfig) -> None:
        LoraLinear.__init__(self, module, module_name, config)
        self.lora_diag = nn.Parameter(torch.randn(self.rank, dtype=self.lora_A.dtype, device=self.lora_A.device))
        right_t, left_scaled = dropped_part(module.weight.detach().float(), self.rank, module_name)
        self.register_buffer("lora_A0", right_t, persistent=False)
        self.register_buffer("lora_B0", left_scaled, persistent=False)

    reset = LoraAdapter.reset  # plain LoRA's start (B = 0 by default), not a decomposition

    def initial_scale(self) -> float:
        """D = B₀A₀ itself is subtracted (no scaling)."""
        return 1.0

    def down_projection(self) -> torch.Tensor:
        """diag(ΔΣ) A."""
        return self.lora_diag[:, None] * self.lora_A

    def regularizer(self, settings: KasaConfig) -> torch.Tensor:
        """β Σ ΔΣ² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), float32 (the paper's eq. 9-11)."""
        lora_A, lora_B = self.lora_A.float(), self.lora_B.float()
        identity = torch.eye(self.rank, device=lora_A.device)
        orthogonality = torch.linalg.norm(lora_B.t() @ lora_B - identity) + torch.linalg.norm(
            lora_A @ lora_A.t() - identity
        )
        return settings.beta * self.lora_diag.float().square().sum() + settings.gamma * orthogonality


def build_kasa(module: nn.Module, module_name: str, config: LoraConfig) -> KasaLinear:
    """KaSA's adapter for one selected module: `nn.Linear` only, as in peft."""
    if type(module) is not nn.Linear:
        raise UnsupportedModuleError(
            f"kasa_config runs on nn.Linear layers only (as in peft), and {module_name} is a {type(module).__name__}; "
            "leave it out of target_modules or set kasa_config=None"
        )
    return KasaLinear(module, module_name, config)
