"""LoRA on bare parameters (`target_parameters`, as peft's `ParamWrapper`): fused expert weights and
other `nn.Parameter`s that a module uses directly instead of through a Linear.

A parameter of shape out × in (2-D), or experts × d1 × d2 (3-D, transformers 5's fused mixture-of-experts
weights), gets factors with peft's shapes and layout, r per expert:

    2-D:  A: r × in,      B: out × r            ΔW = s · B A
    3-D:  A: (r·E) × d2,  B: d1 × (r·E)         ΔW[e] = s · B_e A_e        A_e = A.view(E, r, d2)[e],
                                                                           B_e = B.view(d1, r, E)[:, :, e]
    3-D, the module's `is_transposed`:  A: (r·E) × d1, B: d2 × (r·E),  ΔW[e] = s · (B_e A_e)ᵀ

For the length of each call of the module the parameter reads W + ΔW: the site's pre-hook puts that
tensor in the parameter's place (the module's own code runs unchanged, autograd reaches A and B through
it) and the call's end puts the parameter back, even when the call raised. Merging adds ΔW to W.
Several parameters of one module are one adapter (a module holds one adapter of a name); in peft's
files each is a wrapper around the previous in the module's parameter order, so the k-th of n is stored
under `<module>` + `.base_layer` × (n − 1 − k) + `.lora_A.weight`. No dropout and no DoRA here (peft
refuses both); mixed batches are refused (the parameter is one for the whole batch).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TargetNotFoundError, UnsupportedModuleError
from ..placement import Placement
from ..quantized import quantized_linear
from ..site import CallNote
from ..site_adapter import FLOAT32_UPCAST, SiteAdapter
from ..targeting import model_modules
from .lora import LoraAdapter, LoraConfig


class ParameterFactors(nn.Module):
    """A and B of one parameter, in peft's layout (see the module docstring)."""

    def __init__(self, module: nn.Module, parameter_name: str, key: str, config: LoraConfig) -> None:
        """`key`: the name `rank_pattern` and `alpha_pattern` match, and errors give."""
        super().__init__()
        weight = getattr(module, parameter_name)
        if quantized_linear(module) is not None or not weight.is_floating_point():
            raise UnsupportedModuleError(
                f"target_parameters reaches {key}, a quantized weight; LoRA on parameters needs plain float weights: "
                "target the quantized layer itself in target_modules instead"
            )
        if weight.dim() not in (2, 3):
            raise UnsupportedModuleError(
                f"target_parameters reaches {key}, a {weight.dim()}-D parameter; LoRA adapts 2-D (out × in) and 3-D "
                "(experts × d1 × d2) parameters only: leave it out of target_parameters"
            )
        self.shape = tuple(weight.shape)
        self.experts, first, second = (1, *self.shape) if weight.dim() == 2 else self.shape
        self.transposed = weight.dim() == 3 and bool(getattr(module, "is_transposed", False))
        in_features, out_features = (first, second) if self.transposed else (second, first)
        self.rank = config.rank_for(key)
        self.scaling = config.scaling_for(key)
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.rank * self.experts, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.rank * self.experts, **factory))
        LoraAdapter.reset(self, config.init_lora_weights)

    def products(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R), experts × d1 × r and experts × r × d2, with ΔW = s · L R (viewed in the parameter's shape)."""
        per_expert_A = self.lora_A.view(self.experts, self.rank, -1)  # experts × r × in
        per_expert_B = self.lora_B.view(-1, self.rank, self.experts).permute(2, 0, 1)  # experts × out × r
        if self.transposed:  # ΔW[e] = (B_e A_e)ᵀ = A_eᵀ B_eᵀ
            return per_expert_A.transpose(1, 2), per_expert_B.transpose(1, 2)
        return per_expert_B, per_expert_A

    def adapted(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW, in W's dtype (half-precision weights are added to in float32, as peft does)."""
        left, right = self.products()
        work = weight.float() if weight.dtype in FLOAT32_UPCAST else weight
        stacked = work.reshape(self.experts, *work.shape[-2:])
        summed = torch.baddbmm(stacked, left.to(work.dtype), right.to(work.dtype), alpha=self.scaling)
        return summed.view(self.shape).to(weight.dtype)

    def delta(self) -> torch.Tensor:
        """ΔW in float32, in the parameter's shape."""
        left, right = self.products()
        return torch.bmm(left.detach().float(), right.detach().float()).mul_(self.scaling).view(self.shape)


class LoraParameters(SiteAdapter):
    """LoRA on chosen parameters of one module, by parameter name (in the module's parameter order).
    `paths` maps each factors' key to the parameter's dotted path from the module (a key is the
    parameter's name here; `lora_mha` adapts `in_proj_weight` and `out_proj.weight` of one module)."""

    delta_reads_module = False
    rank_by_parameter = True
    """Whether `rank_pattern` / `alpha_pattern` match `<module>.<parameter>` (peft's rule for
    `target_parameters`) rather than the module's name."""

    def __init__(self, module: nn.Module, module_name: str, paths: dict[str, str], config: LoraConfig) -> None:
        """Factors for each parameter of `paths` ({key: dotted path from `module`})."""
        super().__init__()
        if config.use_dora:
            raise UnsupportedModuleError(
                f"use_dora does not work on {module_name} (LoRA on its parameters {sorted(paths.values())}, as in "
                "peft): set use_dora=False or leave it out of the targets"
            )
        self.paths = paths
        self.factors = nn.ModuleDict(
            {
                key: ParameterFactors(
                    *_owner(module, path), f"{module_name}.{path}" if self.rank_by_parameter else module_name, config
                )
                for key, path in paths.items()
            }
        )
        self._replaced: list[tuple[nn.Module, str, nn.Parameter]] = []
        """The parameters this adapter put back after the call (those it found in place, not replaced)."""

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        for key, factors in self.factors.items():
            owner, name = _owner(module, self.paths[key])
            current = owner._parameters[name]
            if isinstance(current, nn.Parameter):  # another adapter here may have replaced it already
                self._replaced.append((owner, name, current))
            owner._parameters[name] = factors.adapted(current)
        return args, kwargs

    def call_ended(self) -> None:
        while self._replaced:
            owner, name, parameter = self._replaced.pop()
            owner._parameters[name] = parameter

    def close(self) -> None:
        self.call_ended()

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {self.paths[key]: factors.delta() for key, factors in self.factors.items()}

    def extra_repr(self) -> str:
        return f"parameters={list(self.paths.values())}"


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module that holds the parameter at dotted `path` from `module`, its own name for it)."""
    owner_name, _, name = path.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), name


def select_parameters(model: nn.Module, patterns: list[str]) -> dict[str, list[str]]:
    """{module name: its parameter names, in its order} for the parameters that `patterns` select
    (peft's rule: the full name `<module>.<parameter>` equals an entry or ends with `.<entry>`); an entry
    that selects nothing is an error."""
    selected: dict[str, list[str]] = {}
    used: set[str] = set()
    for module_name, module in model_modules(model):
        for parameter_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{parameter_name}" if module_name else parameter_name
            hits = [entry for entry in patterns if key == entry or key.endswith("." + entry)]
            if hits:
                selected.setdefault(module_name, []).append(parameter_name)
                used.update(hits)
    missing = [entry for entry in patterns if entry not in used]
    if missing:
        raise TargetNotFoundError(
            f"target_parameters entries {missing} match no parameter of the model: give a parameter's full name "
            "or its ending (`mlp.experts.gate_up_proj`)"
        )
    return selected


def attach_parameters(placement: Placement, config: LoraConfig) -> None:
    """Put one `LoraParameters` at each module that holds parameters `config.target_parameters` selects."""
    model = placement.model
    if config.lora_dropout:
        raise UnsupportedModuleError(
            f"target_parameters does not work with lora_dropout={config.lora_dropout} (as in peft): the parameter is "
            "one tensor for the whole batch; set lora_dropout=0"
        )
    built = {
        name: LoraParameters(
            model.get_submodule(name), name, {parameter: parameter for parameter in parameters}, config
        )
        for name, parameters in select_parameters(model, config.target_parameters or []).items()
    }
    for name, adapter in built.items():
        placement.put(name, adapter)


def peft_targets(config: LoraConfig, targets: list[str], model: nn.Module) -> tuple[list[str], list[str] | None]:
    """peft's `target_modules` and `target_parameters` for an adapter placed at `targets`: the modules
    that hold adapted parameters are not module targets in peft; the parameters go by full name."""
    hosts = select_parameters(model, config.target_parameters) if config.target_parameters else {}
    keys = [f"{host}.{name}" if host else name for host, names in hosts.items() for name in names]
    return [name for name in targets if name not in hosts], keys or None
