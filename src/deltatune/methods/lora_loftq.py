"""LoftQ on a quantized base (Li et al. 2023, arXiv:2310.08659), as peft's `replace_lora_weights_loftq`.

LoftQ starts a LoRA adapter on a quantized layer so that the quantized weight and the adapter together
come close to the original float weight: with Q the dequantized base weight and W the original,

    s · B A = the best rank-r approximation of W − Q      (Eckart-Young: from the SVD W − Q = U Σ Vᵀ,
    B = U_r √(Σ_r / s), A = √(Σ_r / s) V_rᵀ)

so the model starts at Q + s·B A ≈ W instead of at Q. peft's `init_lora_weights="loftq"` also chooses Q
(it alternates quantizing W − B A and refitting B A) and so rewrites the base; deltatune keeps the
quantized base it was given and takes its one fitting step, which is what peft's
`replace_lora_weights_loftq` does for a base quantized with bitsandbytes. peft sets B A to the rank-r
residual whatever the scale s, so the two agree when lora_alpha = r (s = 1); here s · B A is the
residual's approximation for every s. The original weights are read from the model folder's safetensors
files, one tensor at a time. Any quantized linear deltatune reads (`deltatune.quantized`) serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DeltaTuneError
from ..quantized import quantized_linear

if TYPE_CHECKING:
    from ..model import DeltaModel


def loftq_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s · B A the best rank-r approximation of the float32 (out, in) `residual`."""
    left, values, right_t = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(values[:rank] / scaling)
    return root[:, None] * right_t[:rank], left[:, :rank] * root


def replace_lora_weights_loftq(delta_model: DeltaModel, model_path: str | Path, name: str = "default") -> list[str]:
    """Start the LoRA layers of adapter `name` that sit on quantized linears as LoftQ does (module
    docstring), from the float weights in the safetensors files of folder `model_path`. Returns the
    modules it started; layers on float weights keep their init."""
    from safetensors import safe_open

    from .lora import LoraConfig, LoraLinear

    delta_model.require([name])
    if not isinstance(delta_model.configs[name], LoraConfig):
        raise DeltaTuneError(f"replace_lora_weights_loftq starts LoRA adapters; {name!r} is not one")
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise DeltaTuneError(f"{model_path} holds no .safetensors file with the model's float weights")
    handles = [safe_open(str(file), framework="pt") for file in files]
    stored = {key: handle for handle in handles for key in handle.keys()}
    started = []
    for module_name, site in delta_model.sites():
        module = delta_model.base_model.get_submodule(module_name)
        row, adapter = quantized_linear(module), site.adapters[name] if name in site.adapters else None
        if row is None or not isinstance(adapter, LoraLinear):
            continue
        key = f"{module_name}.weight"
        if key not in stored:
            raise DeltaTuneError(f"{model_path} has no tensor {key!r}; give the folder of the model that was quantized")
        original = stored[key].get_tensor(key).to(device=module.weight.device, dtype=torch.float32)
        lora_A, lora_B = loftq_factors(original - row.dequantize(module), adapter.rank, adapter.scaling)
        with torch.no_grad():
            adapter.lora_A.copy_(lora_A)
            adapter.lora_B.copy_(lora_B)
        started.append(module_name)
    if not started:
        raise DeltaTuneError(f"adapter {name!r} has no LoRA layer on a quantized linear; LoftQ needs a quantized base")
    return started
