"""Generic merge and unmerge over every mergeable adapter (`delta_parameters`).

W ← W + ΔW is computed in float32 (in place for float32 weights, through one float32 copy for
others) and cast back to W's dtype, checked for non-finite values; all or nothing: if any parameter would turn non-finite, the ones already written are restored. A parameter
shared by two modules (tied input/output embeddings) is refused: merging would change both.
Unmerge subtracts the same deltas: recomputed for adapters whose delta does not read the module's
weights (LoRA, BitFit: no copies kept), kept from merge time for the others (`delta_reads_module`).
A bias that a BitFit adapter gave a bias-free module is created on merge and removed on unmerge.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import MergeError
from .site import DeltaSite


def merge_adapters(model: nn.Module, sites: Iterable[tuple[str, DeltaSite]], names: list[str]) -> None:
    """Fold adapters `names` into the weights of `model` at every site that holds them."""
    tied = _tied_parameters(model)
    written: list[tuple[nn.Module, DeltaSite, str, dict[str, torch.Tensor]]] = []
    try:
        for module_name, site in list(sites):
            module = model.get_submodule(module_name)
            for name in names:
                if name not in site.adapters or name in site.merged:
                    continue
                deltas = site.adapters[name].delta_parameters(module)
                for parameter_name in deltas:
                    full_name = f"{module_name}.{parameter_name}"
                    if full_name in tied:
                        raise MergeError(
                            f"cannot merge into {full_name}: it is tied to {tied[full_name]} and both would "
                            "change. Untie them first, or use the adapter unmerged (unload(merge=False))"
                        )
                _apply(module, site, deltas, sign=1.0, context=f"adapter {name!r} at {module_name}")
                written.append((module, site, name, deltas))
                site.merged.append(name)
                if site.adapters[name].delta_reads_module:
                    site.merged_deltas[name] = deltas
    except BaseException:
        for module, site, name, deltas in reversed(written):
            _apply(module, site, deltas, sign=-1.0, context="rollback")
            site.merged.remove(name)
            site.merged_deltas.pop(name, None)
        raise


def unmerge_adapters(model: nn.Module, sites: Iterable[tuple[str, DeltaSite]]) -> None:
    """Subtract every merged adapter again (in reverse order of merging)."""
    for module_name, site in list(sites):
        module = model.get_submodule(module_name)
        for name in reversed(site.merged):
            deltas = site.merged_deltas.pop(name, None) or site.adapters[name].delta_parameters(module)
            _apply(module, site, deltas, sign=-1.0, context=name)
        site.merged.clear()
        for parameter_name in sorted(site.created_parameters):
            setattr(module, parameter_name, None)
        site.created_parameters.clear()


def _apply(module: nn.Module, site: DeltaSite, deltas: dict[str, torch.Tensor], sign: float, context: str) -> None:
    for parameter_name, delta in deltas.items():
        target = _parameter_or_new(module, site, parameter_name, delta).detach()
        work = target if target.dtype == torch.float32 else target.float()  # float32 weights: in place
        work.add_(delta.to(target.device), alpha=sign)
        if not torch.isfinite(work.sum()):  # one reduction, no full-size mask; inf and NaN propagate
            if work is target:
                work.sub_(delta.to(target.device), alpha=sign)
            raise MergeError(f"merging {context} gives non-finite values in {parameter_name}; the adapter weights are broken")
        if work is not target:
            target.copy_(work)


def _parameter_or_new(module: nn.Module, site: DeltaSite, parameter_name: str, delta: torch.Tensor) -> nn.Parameter:
    parameter = module.get_parameter(parameter_name) if _has_parameter(module, parameter_name) else None
    if parameter is None:
        reference = module.weight
        parameter = nn.Parameter(torch.zeros(delta.shape, dtype=reference.dtype, device=reference.device), requires_grad=False)
        setattr(module, parameter_name, parameter)
        site.created_parameters.add(parameter_name)
    return parameter


def _has_parameter(module: nn.Module, parameter_name: str) -> bool:
    owner_name, _, leaf = parameter_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters.get(leaf) is not None


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{parameter name: another name of the same tensor} for parameters shared between modules."""
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        other = first_name.setdefault(id(parameter), name)
        if other != name:
            tied[name], tied[other] = other, name
    return tied
