"""Generic merge and unmerge over every mergeable adapter (`delta_parameters`), all or nothing.

W ← W + ΔW is computed in float32 (float64 weights: in float64), rounded to W's dtype, and checked for
non-finite values there: a float16 weight that ΔW pushes past 65504 is refused although the float32 sum
is finite. A tensor shared by two modules (tied input/output embeddings) is refused: merging would
change both, unless the adapter says its delta is meant for all of them (`merges_tied_weights`). Shared
means the same storage, parameter or buffer: a GGUF head tied to its embedding is a `GGUFLinear` whose
weight buffer is the embedding's blocks.

All or nothing, without a copy of the model: a merge makes two passes over the adapted modules.
1. Check, writing nothing: per module, every new value is computed into a temporary (one module's
   parameters at a time) and refused if any element is not finite.
2. Write: the same computation again, in place.
Every refusal comes in pass 1, so a refused merge leaves every base weight bit-identical. An adapter
whose delta reads the module's weights (`delta_reads_module`) sees, in pass 1, the values the adapters
before it at that module would have written (`_showing`), so both passes compute the same numbers.
The price is computing each delta twice; keeping a copy of every weight touched, to restore it, would
instead double the memory of a model adapted on all its linear layers. Should pass 2 fail anyway (out of
memory, an interrupt), what it wrote is subtracted again, which is exact only to rounding (below).

Unmerge subtracts the same deltas, in the same two passes: recomputed for adapters whose delta does not
read the module's weights (LoRA, BitFit: no copies kept), kept from merge time for the others. After a
successful merge, W + ΔW − ΔW gives W back to within a rounding step of W's dtype per adapter (float32:
about 1e-7 relative), not bit-exactly: that would need the copy of every weight that the two passes
avoid. A delta that sets rows (`RowValues`: trained embedding rows) instead keeps the rows it overwrote,
and unmerge puts them back bit-exactly. A bias that a BitFit adapter gave a bias-free module is created on
merge and removed on unmerge.

Quantized layers (`deltatune.quantized`): a delta into packed storage (a 4-bit or 8-bit weight) is refused
in pass 1, naming the way out; a delta into a float parameter of such a layer (its bias) merges as usual.
`merge_dequantized` is that way out: each adapted quantized layer is replaced by a plain float32 Linear
holding its dequantized weight, and the adapters are merged into that, in the same two passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from .errors import MergeError
from .quantized import dequantized_linear, quantized_linear
from .site import DeltaSite
from .site_adapter import RowValues


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
        todo = composition_order(site, [name for name in names if name in site.adapters and name not in site.merged])
        if todo:
            steps.append(Step(module_name, model.get_submodule(module_name), site, todo))
    _run(steps, merging=True, tied=_tied_parameters(model))


def merge_dequantized(
    model: nn.Module, sites: Iterable[tuple[str, DeltaSite]], names: list[str]
) -> dict[str, nn.Linear]:
    """Merge adapters `names` as `merge_adapters` does, except at quantized layers: there into a float32
    `nn.Linear` holding the dequantized weight. Returns {module name: that Linear}, for the caller to
    put in place of the quantized layer once the adapters are removed; the quantized layers themselves
    are not written."""
    steps, plain = [], {}
    for module_name, site in list(sites):
        todo = composition_order(site, [name for name in names if name in site.adapters and name not in site.merged])
        if not todo:
            continue
        module = model.get_submodule(module_name)
        if quantized_linear(module) is not None:
            module = plain[module_name] = dequantized_linear(module)
        steps.append(Step(module_name, module, site, todo))
    _run(steps, merging=True, tied=_tied_parameters(model))
    return plain


def composition_order(site: DeltaSite, names: list[str]) -> list[str]:
    """`names` in the order their deltas fold into the weights so that the merged layer computes what the
    forward does: the forward rewrites the input with every `prepare` adapter in activation order
    (x → P₂ P₁ x), then the layer and the output-side adapters read that input. So the output-side deltas
    go first, in the order given, then the input rewriters, the last to run first: ((W + ΔW_out) P₂) P₁.
    (Rewriters not active now are taken to run in the order given, after the active ones.)"""
    running = [id(adapter) for adapter in site.active]
    rewriters = sorted(
        (name for name in names if name in site.preparing),
        key=lambda name: running.index(id(site.adapters[name])) if id(site.adapters[name]) in running else len(running),
    )
    return [name for name in names if name not in site.preparing] + rewriters[::-1]


def unmerge_adapters(model: nn.Module, sites: Iterable[tuple[str, DeltaSite]]) -> None:
    """Subtract every merged adapter again (in reverse order of merging)."""
    steps = [
        Step(module_name, model.get_submodule(module_name), site, site.merged[::-1])
        for module_name, site in list(sites)
        if site.merged
    ]
    _run(steps, merging=False, tied={})


def _run(steps: list[Step], merging: bool, tied: dict[str, str]) -> None:
    """Pass 1 checks every module, pass 2 writes (see the module docstring)."""
    for step in steps:
        _check(step, merging, tied)
    written: list[tuple[Step, str]] = []
    try:
        for step in steps:
            for name in step.names:
                _write(step, name, merging)
                written.append((step, name))
    except BaseException:
        for step, name in reversed(written):
            _write(step, name, not merging)
        raise


def _check(step: Step, merging: bool, tied: dict[str, str]) -> None:
    """Compute the new values of one module's parameters without writing any; refuse non-finite ones."""
    values: dict[str, torch.Tensor] = {}  # parameter name → its value after the adapters so far
    quantized = quantized_linear(step.module)
    for name in step.names:
        reads = step.site.adapters[name].delta_reads_module
        with _showing(step.module, values) if reads else contextlib.nullcontext():
            deltas = _deltas(step, name, merging)
        if not step.site.adapters[name].merges_tied_weights:
            _refuse_tied(step.module_name, deltas, tied)
        if quantized is not None and merging:
            _refuse_quantized(step, name, deltas, quantized)
        for parameter_name, delta in deltas.items():
            current = values.get(parameter_name)
            if current is None:
                current = _parameter(step.module, parameter_name)
            current = current.detach() if current is not None else _zeros_for(step.module, delta)
            values[parameter_name] = _applied(current, delta, merging)
            if not _all_finite(values[parameter_name]):
                verb = "merging" if merging else "unmerging"
                dtype = str(current.dtype).removeprefix("torch.")
                raise MergeError(
                    f"{verb} adapter {name!r} at {step.module_name} gives non-finite values in {parameter_name} "
                    f"({dtype}), so no weight was changed: the adapter weights are broken or the result overflows "
                    f"{dtype} (merge into a float32 copy of the model, or use the adapter unmerged)"
                )


def _write(step: Step, name: str, merging: bool) -> None:
    """Add (merging) or subtract adapter `name`'s deltas in place at one module, and record it there."""
    site = step.site
    deltas = _deltas(step, name, merging)
    kept = {}
    for parameter_name, delta in deltas.items():
        target = _parameter(step.module, parameter_name)
        if target is None:
            target = nn.Parameter(_zeros_for(step.module, delta), requires_grad=False)
            setattr(step.module, parameter_name, target)
            site.created_parameters.add(parameter_name)
        kept[parameter_name] = _overwritten(target.detach(), delta)
        _applied(target.detach(), delta, merging, out=target.detach())
    if merging:
        site.merges[name] = kept if site.adapters[name].delta_reads_module else None
        return
    del site.merges[name]
    if not site.merges:
        for parameter_name in sorted(site.created_parameters):
            setattr(step.module, parameter_name, None)
        site.created_parameters.clear()


def _deltas(step: Step, name: str, merging: bool) -> dict[str, torch.Tensor]:
    kept = None if merging else step.site.merges.get(name)
    return kept if kept is not None else step.site.adapters[name].delta_parameters(step.module)


def _applied(
    weight: torch.Tensor, delta: torch.Tensor | RowValues, merging: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`weight` with `delta` added (merging) or subtracted, or with its rows set (`RowValues`: merge sets
    the trained rows, unmerge the rows that merge kept); written into `out` if given."""
    if isinstance(delta, RowValues):
        value = out if out is not None else weight.clone()
        return value.index_copy_(0, delta.indices.to(value.device), delta.values.to(value.device, value.dtype))
    return _added(weight, delta, 1.0 if merging else -1.0, out)


def _overwritten(weight: torch.Tensor, delta: torch.Tensor | RowValues) -> torch.Tensor | RowValues:
    """What unmerge needs to undo `delta` at `weight`: the delta itself, or the rows it is about to set."""
    if isinstance(delta, RowValues):
        return RowValues(delta.indices, weight.index_select(0, delta.indices.to(weight.device)))
    return delta


def _added(weight: torch.Tensor, delta: torch.Tensor, sign: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight + sign · delta in float32 (or wider), rounded to weight's dtype; written into `out` if given.
    Both passes use this one function, so the values pass 1 checks are the ones pass 2 writes."""
    work_dtype = torch.promote_types(weight.dtype, torch.float32)
    delta = delta.to(device=weight.device, dtype=work_dtype)
    if weight.dtype == work_dtype:
        return torch.add(weight, delta, alpha=sign, out=out)
    value = weight.to(work_dtype).add_(delta, alpha=sign)
    return value.to(weight.dtype) if out is None else out.copy_(value)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±inf: they reach the minimum or the maximum (one read, no full-size mask)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


@contextlib.contextmanager
def _showing(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the block runs, the module's parameters hold `values` (a bias not created yet appears as
    one); afterwards every parameter holds its own tensor again, bits untouched."""
    shown: list[tuple[str, nn.Parameter | None, torch.Tensor | None]] = []
    try:
        for parameter_name, value in values.items():
            parameter = _parameter(module, parameter_name)
            if parameter is None:
                setattr(module, parameter_name, nn.Parameter(value, requires_grad=False))
                shown.append((parameter_name, None, None))
            else:
                shown.append((parameter_name, parameter, parameter.data))
                parameter.data = value
        yield
    finally:
        for parameter_name, parameter, own in reversed(shown):
            if parameter is None:
                setattr(module, parameter_name, None)
            else:
                parameter.data = own


def _refuse_tied(module_name: str, deltas: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    for parameter_name in deltas:
        full_name = f"{module_name}.{parameter_name}"
        if full_name in tied:
            raise MergeError(
                f"cannot merge into {full_name}: it is tied to {tied[full_name]} and both would "
                "change. Untie them first, or use the adapter unmerged (unload(merge=False))"
            )


def _refuse_quantized(step: Step, name: str, deltas: dict[str, torch.Tensor], quantized) -> None:
    packed = [parameter_name for parameter_name in deltas if parameter_name in quantized.quantized_parameters]
    if packed:
        raise MergeError(
            f"cannot merge adapter {name!r} into {step.module_name}.{packed[0]}: it is quantized "
            f"({quantized.describe(step.module)}) and adding the delta to its packed storage would lose most "
            "of it, so no weight was changed. Use unload(merge=True, dequantize=True) for a model whose adapted "
            "layers are dequantized float32 Linears with the adapter merged, or keep the adapter unmerged"
        )


def _parameter(module: nn.Module, parameter_name: str) -> nn.Parameter | None:
    """The module's parameter `parameter_name` (dotted for a submodule's), None where it has none."""
    owner_name, _, leaf = parameter_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters.get(leaf)


def _zeros_for(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The starting value of a parameter a delta creates (a new bias): zeros in the module's weight dtype."""
    reference = module.weight
    dtype = reference.dtype if reference.is_floating_point() else quantized_linear(module).compute_dtype(module)
    return torch.zeros(delta.shape, dtype=dtype, device=reference.device)


def storage_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's values in memory: where they start, their shape and dtype; the object
    itself where it has no address of its own (empty, on the meta device, or a wrapper tensor subclass
    such as torchao's, whose `data_ptr()` is 0)."""
    address = 0 if tensor.is_meta or tensor.numel() == 0 else tensor.data_ptr()
    if address == 0:
        return (id(tensor),)
    return (tensor.device, address, tuple(tensor.shape), tensor.dtype)


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{tensor name: another name of the same tensor} for parameters and buffers shared between modules."""
    first_name: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        other = first_name.setdefault(storage_key(tensor), name)
        if other != name:
            tied[name], tied[other] = other, name
    return tied
