"""Generic merge and unmerge over every mergeable adapter (`delta_parameters`), all or nothing.

W ← W + ΔW is computed in float32 (in place for float32 weights, through one float32 copy for others)
and checked for non-finite values after the cast back to W's dtype: a float16 weight that ΔW pushes
past 65504 is refused although the float32 sum is finite. A parameter shared by two modules (tied
input/output embeddings) is refused: merging would change both.

All or nothing, without a second copy of the model: a merge makes two passes over the adapted modules,
one module at a time.
1. Check: write the module's new values, check them, then put back the bits kept before the first
   write (a copy of that one module's touched parameters, freed before the next module).
2. Write: the same computation again, kept.
Every refusal (non-finite values, a tied parameter) comes in pass 1, so a refused merge leaves every base
weight bit-identical. Writing in place during the check lets an adapter whose delta reads the module's
weights (`delta_reads_module`) see what the adapters before it at that module wrote, exactly as in
pass 2. The price is computing each delta twice (cheap next to one forward pass); keeping the original
of every weight touched instead would double the memory of a model adapted on all its linear layers.
Should pass 2 fail anyway (out of memory, an interrupt), its current module is restored bit-exactly
and the modules written before it are unmerged again, exact only to rounding (below).

Unmerge subtracts the same deltas, in the same two passes: recomputed for adapters whose delta does not
read the module's weights (LoRA, BitFit: no copies kept), kept from merge time for the others. After a
successful merge, W + ΔW − ΔW gives W back to within a rounding step of W's dtype per adapter (float32:
about 1e-7 relative), not bit-exactly: that would need the copy of every original weight that the two
passes avoid. A bias that a BitFit adapter gave a bias-free module is created on merge and removed on
unmerge (and on a refused merge).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from .errors import MergeError
from .site import DeltaSite


class Step(NamedTuple):
    """One module's share of a merge or an unmerge."""

    module_name: str
    module: nn.Module
    site: DeltaSite
    names: list[str]
    """The adapters, in the order their deltas are added (merge) or subtracted (unmerge)."""


def merge_adapters(model: nn.Module, sites: Iterable[tuple[str, DeltaSite]], names: list[str]) -> None:
    """Fold adapters `names` into the weights of `model` at every site that holds them."""
    steps = []
    for module_name, site in list(sites):
        todo = [name for name in names if name in site.adapters and name not in site.merged]
        if todo:
            steps.append(Step(module_name, model.get_submodule(module_name), site, todo))
    _run(steps, merging=True, tied=_tied_parameters(model))


def unmerge_adapters(model: nn.Module, sites: Iterable[tuple[str, DeltaSite]]) -> None:
    """Subtract every merged adapter again (in reverse order of merging)."""
    steps = [Step(module_name, model.get_submodule(module_name), site, site.merged[::-1]) for module_name, site in list(sites) if site.merged]
    _run(steps, merging=False, tied={})


def _run(steps: list[Step], merging: bool, tied: dict[str, str]) -> None:
    """Pass 1 checks every module and leaves it as it was; pass 2 writes (see the module docstring)."""
    for step in steps:
        _fold(step, merging, tied, keep=False)
    written: list[Step] = []
    try:
        for step in steps:
            _fold(step, merging, tied, keep=True)
            written.append(step)
    except BaseException:
        for step in reversed(written):
            _fold(step._replace(names=step.names[::-1]), not merging, {}, keep=True)
        raise


def _fold(step: Step, merging: bool, tied: dict[str, str], keep: bool) -> None:
    """Add (merging) or subtract the deltas of `step.names` at one module. With `keep` the result stays
    and is recorded on the site; otherwise, and on any error, every bit of the module is put back."""
    write = ModuleWrite(step.module, step.site)
    verb = "merging" if merging else "unmerging"
    applied: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name in step.names:
            deltas = _deltas(step, name, merging)
            _refuse_tied(step.module_name, deltas, tied)
            for parameter_name, delta in deltas.items():
                write.add(parameter_name, delta, 1.0 if merging else -1.0, f"{verb} adapter {name!r} at {step.module_name}")
            applied[name] = deltas
    except BaseException:
        write.restore()
        raise
    if not keep:
        write.restore()
        return
    _record(step, applied, merging)


def _deltas(step: Step, name: str, merging: bool) -> dict[str, torch.Tensor]:
    kept = None if merging else step.site.merged_deltas.get(name)
    return kept if kept is not None else step.site.adapters[name].delta_parameters(step.module)


def _refuse_tied(module_name: str, deltas: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    for parameter_name in deltas:
        full_name = f"{module_name}.{parameter_name}"
        if full_name in tied:
            raise MergeError(
                f"cannot merge into {full_name}: it is tied to {tied[full_name]} and both would "
                "change. Untie them first, or use the adapter unmerged (unload(merge=False))"
            )


def _record(step: Step, applied: dict[str, dict[str, torch.Tensor]], merging: bool) -> None:
    site = step.site
    for name, deltas in applied.items():
        if merging:
            site.merged.append(name)
            if site.adapters[name].delta_reads_module:
                site.merged_deltas[name] = deltas
        else:
            site.merged.remove(name)
            site.merged_deltas.pop(name, None)
    if not site.merged:
        for parameter_name in sorted(site.created_parameters):
            setattr(step.module, parameter_name, None)
        site.created_parameters.clear()


class ModuleWrite:
    """Writes into one module's parameters that `restore` undoes bit-exactly: each parameter's bits are
    kept before its first write, and a parameter created here (a new bias) is removed again."""

    def __init__(self, module: nn.Module, site: DeltaSite) -> None:
        self.module = module
        self.site = site
        self.originals: dict[str, torch.Tensor | None] = {}
        """Parameter name → its bits before the first write (None: created by this write)."""

    def add(self, parameter_name: str, delta: torch.Tensor, sign: float, context: str) -> None:
        """W ← W + sign · delta in float32, cast to W's dtype, refused if any value is not finite there."""
        target = self._target(parameter_name, delta)
        work = target if target.dtype == torch.float32 else target.float()  # float32 weights: in place
        work.add_(delta.to(target.device), alpha=sign)
        if work is not target:
            target.copy_(work)
        if not torch.isfinite(target).all():  # a mask of one parameter; a sum could overflow on finite values
            dtype = str(target.dtype).removeprefix("torch.")
            raise MergeError(
                f"{context} gives non-finite values in {parameter_name} ({dtype}), so no weight was changed: the "
                f"adapter weights are broken or the result overflows {dtype} (merge into a float32 copy of the "
                "model, or use the adapter unmerged)"
            )

    def restore(self) -> None:
        for parameter_name, original in self.originals.items():
            if original is None:
                setattr(self.module, parameter_name, None)
                self.site.created_parameters.discard(parameter_name)
            else:
                self.module.get_parameter(parameter_name).detach().copy_(original)
        self.originals.clear()

    def _target(self, parameter_name: str, delta: torch.Tensor) -> torch.Tensor:
        if parameter_name not in self.originals:
            if _has_parameter(self.module, parameter_name):
                self.originals[parameter_name] = self.module.get_parameter(parameter_name).detach().clone()
            else:
                self._create(parameter_name, delta)
                self.originals[parameter_name] = None
        return self.module.get_parameter(parameter_name).detach()

    def _create(self, parameter_name: str, delta: torch.Tensor) -> None:
        reference = self.module.weight
        parameter = nn.Parameter(torch.zeros(delta.shape, dtype=reference.dtype, device=reference.device), requires_grad=False)
        setattr(self.module, parameter_name, parameter)
        self.site.created_parameters.add(parameter_name)


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
