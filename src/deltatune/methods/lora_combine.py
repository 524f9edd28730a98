"""A new LoRA adapter from a weighted combination of existing ones (peft's `add_weighted_adapter`).

At each module adapter i has factors A_i, B_i and scale s_i (ΔW_i = s_i B_i A_i). The new adapter has
scaling 1 (lora_alpha = rank, no rsLoRA), so its factors carry the scales:
- "cat" (exact): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]; rank = Σ r_i.
- on the factors (peft's; equal ranks): "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"
  merge the A_i with weights sgn(w_i s_i) √|w_i s_i| and, separately, the B_i with √|w_i s_i|
  (`lora_merge_methods`). Not ΔW in general (cross terms), kept for compatibility with peft's results.
- on ΔW, then the best rank-k approximation: "svd" (linear), "ties_svd", "dare_linear_svd",
  "dare_ties_svd", "magnitude_prune_svd" merge the ΔW_i with weights w_i, then ΔW ≈ U_k S_k V_kᵀ with
  k = `svd_rank` (default max r_i): B = U_k S_k, A = V_kᵀ, both clamped to ±q if `svd_clamp` is given
  (q: that quantile of the entries of B and A together).
With one adapter the result is "linear" whatever the type, as in peft.

Random seeds: peft first builds the new adapter's layers (nn.Linear(in, r), nn.Linear(r, out) and their
init, all from the global generator), then draws DARE's masks module by module (the A_i, then the B_i;
or the ΔW_i), in the order of `named_modules()`. We make the same draws in the same order (the layer
draws on scratch tensors, our own adapter's init with the generator's state saved and restored), so the
same `torch.manual_seed` gives peft's masks and leaves the generator where peft leaves it. The SVD forms
merge ΔW in the layout of the layer's weight, as peft does ((in, out) for GPT-2's Conv1D and embeddings).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeltaTuneError
from .lora import LoraAdapter, LoraConfig, LoraConv, LoraEmbedding
from .lora_merge_methods import MERGES, PRUNING_MERGES, SIGN_METHODS, Pruning

if TYPE_CHECKING:
    from ..model import DeltaModel

FACTOR_MERGES = tuple(MERGES)
SVD_MERGES = ("svd", *(f"{merge}_svd" for merge in PRUNING_MERGES))
COMBINATIONS = ("cat", *FACTOR_MERGES, *SVD_MERGES)
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclasses.dataclass(frozen=True)
class SvdSettings:
    """The SVD forms' truncation: rank, clamp quantile, and `torch.linalg.svd`'s options."""

    rank: int | None = None
    clamp: float | None = None
    full_matrices: bool = True
    driver: str | None = None


def add_weighted_adapter(
    delta_model: DeltaModel,
    adapters: list[str],
    weights: list[float],
    name: str,
    combination_type: str,
    svd: SvdSettings,
    density: float | None,
    majority_sign_method: str,
) -> None:
    """Add LoRA adapter `name` combining `adapters` (see the module's docstring) to `delta_model`."""
    delta_model.require(adapters)
    kind = _checked_kind(adapters, weights, combination_type, svd, density, majority_sign_method)
    configs = [delta_model.configs[adapter] for adapter in adapters]
    if not all(isinstance(config, LoraConfig) for config in configs):
        raise DeltaTuneError("add_weighted_adapter combines LoRA adapters only; pass only LoRA adapters' names")
    _refuse_parts_beyond_the_factors(adapters, configs)
    apart = sorted(
        {
            adapter
            for _, site in delta_model.sites()
            for adapter in adapters
            if adapter in site.adapters and _apart(site.adapters[adapter])
        }
    )
    if apart:
        raise DeltaTuneError(
            f"add_weighted_adapter cannot combine {', '.join(apart)}: LoRA on bare parameters, on MultiheadAttention, "
            "on grouped convolutions or on parts of a fused output (fused_slices) is not a plain layer's A and B; "
            "combine adapters without such targets"
        )
    started = sorted(
        {
            adapter
            for _, site in delta_model.sites()
            for adapter in adapters
            if adapter in site.adapters and hasattr(site.adapters[adapter], "lora_B0")
        }
    )
    if started:
        raise DeltaTuneError(
            f"add_weighted_adapter cannot combine {', '.join(started)} as they are: an adapter started from the "
            "base's decomposition (PiSSA, OLoRA, CorDA) also subtracts its frozen start s·B₀A₀, which the "
            "factors alone leave out; convert each with deltatune.to_plain_lora(model, name, new_name) and "
            "combine the converted adapters"
        )
    per_module = _factors_per_module(delta_model, adapters)
    on_cuda = all(layer.lora_A.is_cuda for pieces in per_module.values() for _, layer in pieces)
    if svd.driver is not None and not on_cuda:
        raise DeltaTuneError("svd_driver chooses a cuSOLVER method and works only on CUDA; leave it None here")
    peft_rank = _new_rank(kind, per_module, svd.rank)
    _draw_as_peft_builds_layers(per_module, peft_rank, configs[0].init_lora_weights)
    pruning = Pruning(density if density is not None else 1.0, majority_sign_method)
    new_factors = {module: _combine(pieces, weights, kind, svd, pruning) for module, pieces in per_module.items()}
    ranks = {module: lora_A.shape[0] for module, (lora_A, _) in new_factors.items()}
    rank = max(ranks.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(module): r for module, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(module): r for module, r in ranks.items() if r != rank},
    )
    devices = sorted({p.device.index or 0 for p in delta_model.base_model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # our init of the new adapter draws nothing peft would
        delta_model.add(name, config, trainable=False, weights_from_file=True)
    try:
        for module_name, site in delta_model.sites():
            if module_name in new_factors:
                adapter = site.adapters[name]
                current = adapter.file_state()
                lora_A, lora_B = new_factors[module_name]
                adapter.load_file_state(
                    {"lora_A": lora_A.to(current["lora_A"].dtype), "lora_B": lora_B.to(current["lora_B"].dtype)}
                )
    except BaseException:
        delta_model.delete(name)
        raise


REFUSED_PARTS: tuple[tuple[Callable[[LoraConfig], object], str], ...] = (
    (
        lambda c: c.use_dora or c.kasa_config,
        "add_weighted_adapter cannot combine DoRA or KaSA adapters ({names}): their magnitudes, singular values and "
        "truncated bases do not combine like LoRA factors; merge each into the weights (merge()) instead",
    ),
    (
        lambda c: c.use_bdlora is not None,
        "add_weighted_adapter cannot combine {names}: a block-diagonal factor (use_bdlora) would lose its blocks in "
        "the combination; merge each into the weights (merge()) instead",
    ),
    (
        lambda c: c.lora_bias or c.bias != "none" or c.trainable_token_indices,
        "add_weighted_adapter combines LoRA's A and B only, and {names} also train biases or token rows, which the "
        "combination would drop; merge each into the weights (merge()) instead",
    ),
    (
        lambda c: c.modules_to_save,
        "add_weighted_adapter cannot combine {names}: a copy of {modules} (modules_to_save) is a whole trained "
        "module, not LoRA factors, which the combination would drop (peft refuses two copies of one module); merge "
        "each into the weights (merge()) instead",
    ),
    (
        lambda c: c.use_gating,
        "add_weighted_adapter cannot combine {names}: a gated LoRA's gate (use_gating) depends on its input, so its "
        "ΔW is no fixed s·B A that a weight could scale; combine LoRA adapters trained without use_gating",
    ),
)
"""Adapters whose configs give them parts that the new adapter's A and B cannot hold, with the refusal."""


def _refuse_parts_beyond_the_factors(adapters: list[str], configs: list[LoraConfig]) -> None:
    """Refuse, in one line, adapters that would not be themselves in the combination (`REFUSED_PARTS`)."""
    for has_part, message in REFUSED_PARTS:
        refused = [(adapter, config) for adapter, config in zip(adapters, configs) if has_part(config)]
        if refused:
            modules = sorted({module for _, config in refused for module in config.modules_to_save or []})
            raise DeltaTuneError(
                message.format(names=", ".join(adapter for adapter, _ in refused), modules=", ".join(modules))
            )


def _finite_number(weight: object) -> bool:
    """Whether `weight` is a finite real number (a float, an int, a one-element tensor)."""
    try:
        return not isinstance(weight, str) and math.isfinite(float(weight))
    except (TypeError, ValueError, RuntimeError):
        return False


def _checked_kind(
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    svd: SvdSettings,
    density: float | None,
    majority_sign_method: str,
) -> str:
    """The combination to run (peft's rule: "linear" for one adapter), after checking the options."""
    if combination_type not in COMBINATIONS:
        raise DeltaTuneError(f"unknown combination_type {combination_type!r}; use one of {', '.join(COMBINATIONS)}")
    if majority_sign_method not in SIGN_METHODS:
        raise DeltaTuneError(f"unknown majority_sign_method {majority_sign_method!r}; use 'total' or 'frequency'")
    if len(adapters) != len(weights) or not adapters:
        raise DeltaTuneError("pass one weight per adapter (and at least one adapter)")
    if not all(_finite_number(weight) for weight in weights):
        raise DeltaTuneError(f"weights must be finite numbers, got {list(weights)}; pass one real weight per adapter")
    prunes = combination_type.removesuffix("_svd") in PRUNING_MERGES
    if prunes and (density is None or not 0 < density <= 1):
        raise DeltaTuneError(f"combination_type {combination_type!r} needs a density in (0, 1]; got {density!r}")
    if svd.driver not in SVD_DRIVERS:
        raise DeltaTuneError(f"unknown svd_driver {svd.driver!r}; use None, 'gesvd', 'gesvdj' or 'gesvda'")
    if svd.clamp is not None and not 0 <= svd.clamp <= 1:
        raise DeltaTuneError(f"svd_clamp is a quantile in [0, 1]; got {svd.clamp!r}")
    return "linear" if len(adapters) == 1 else combination_type


def _apart(layer: nn.Module) -> bool:
    """Whether `layer` is LoRA that the combinations cannot take in: on parameters, a grouped conv, or parts
    of a fused output (its stacked factors are one pair per part)."""
    from .lora_fused import FusedSliceLora  # they build on lora, as this module does
    from .lora_parameter import LoraParameters

    return isinstance(layer, (LoraParameters, FusedSliceLora)) or (isinstance(layer, LoraConv) and layer.groups != 1)


def _factors_per_module(delta_model: DeltaModel, adapters: list[str]) -> dict[str, list[tuple[int, LoraAdapter]]]:
    """{module: [(index of the adapter, its LoRA layer)]} over the modules any of them adapts, in
    `named_modules()` order."""
    found: dict[str, list[tuple[int, LoraAdapter]]] = {}
    for module_name, site in delta_model.sites():
        for index, adapter in enumerate(adapters):
            if adapter in site.adapters and isinstance(site.adapters[adapter], LoraAdapter):
                found.setdefault(module_name, []).append((index, site.adapters[adapter]))
    return found


def _new_rank(kind: str, per_module: dict[str, list[tuple[int, LoraAdapter]]], svd_rank: int | None) -> int:
    """The rank peft gives the new adapter's layers (every module): Σ r_i ("cat"), `svd_rank` or max r_i
    (SVD forms), the common r (factor merges, which refuse unequal ranks)."""
    largest: dict[int, int] = {}
    for pieces in per_module.values():
        for index, layer in pieces:
            largest[index] = max(largest.get(index, 0), layer.rank)
    if kind == "cat":
        return sum(largest.values())
    if kind in SVD_MERGES:
        return svd_rank or max(largest.values())
    if len({layer.rank for pieces in per_module.values() for _, layer in pieces}) != 1:
        raise DeltaTuneError(
            f"combination_type {kind!r} needs adapters of equal rank; use 'cat' or an SVD form such as '{kind}_svd'"
            if kind != "linear"
            else "combination_type 'linear' needs adapters of equal rank; use 'cat' or 'svd'"
        )
    return next(iter(largest.values()))


def _draw_as_peft_builds_layers(
    per_module: dict[str, list[tuple[int, LoraAdapter]]], rank: int, init: bool | str
) -> None:
    """Advance the CPU generator as peft's building of the new adapter does: per module, the draws of
    creating A and B (Linear: kaiming-uniform; Embedding: randn; Conv: kaiming-uniform), then of peft's
    init of A (True: kaiming-uniform, "gaussian": normal) or, for embeddings, of B (normal)."""
    for pieces in per_module.values():
        layer = pieces[0][1]
        a_shape, b_shape = (rank, *layer.lora_A.shape[1:]), (layer.lora_B.shape[0], rank, *layer.lora_B.shape[2:])
        scratch_A, scratch_B = torch.empty(a_shape), torch.empty(b_shape)
        if isinstance(layer, LoraEmbedding):
            scratch_A.normal_()
            scratch_B.normal_()
            if init is not False:
                scratch_B.normal_()
            continue
        nn.init.kaiming_uniform_(scratch_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(scratch_B, a=math.sqrt(5))
        if init == "gaussian":
            scratch_A.normal_()
        elif init is not False:
            nn.init.kaiming_uniform_(scratch_A, a=math.sqrt(5))


def _combine(
    pieces: list[tuple[int, LoraAdapter]], weights: list[float], kind: str, svd: SvdSettings, pruning: Pruning
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the new adapter at one module."""
    reference = pieces[0][1].lora_A
    pruning = dataclasses.replace(pruning, draw_dtype=reference.dtype)
    scaled = [
        (weights[index] * layer.scaling, layer.lora_A.detach().float(), layer.lora_B.detach().float())
        for index, layer in pieces
    ]
    if kind == "cat":
        return torch.cat([w * a for w, a, _ in scaled]), torch.cat([b for _, _, b in scaled], dim=1)
    if kind in FACTOR_MERGES:
        merge = MERGES[kind]
        roots = [math.sqrt(abs(w)) for w, _, _ in scaled]
        signs = [1.0 if w >= 0 else -1.0 for w, _, _ in scaled]
        signed_roots = torch.tensor([sign * root for sign, root in zip(signs, roots)], device=reference.device)
        lora_A = merge([a for _, a, _ in scaled], signed_roots, pruning)
        lora_B = merge([b for _, _, b in scaled], torch.tensor(roots, device=reference.device), pruning)
        return lora_A, lora_B
    merge = MERGES[kind.removesuffix("_svd") if kind != "svd" else "linear"]
    a_shape, b_shape = scaled[0][1].shape[1:], scaled[0][2].shape
    # merged in the layout peft merges them in (W's stored layout), so that DARE's masks fall alike
    transposed = getattr(pieces[0][1], "transposed", False) or isinstance(pieces[0][1], LoraEmbedding)
    deltas = [layer.delta_matrix().t() if transposed else layer.delta_matrix() for _, layer in pieces]
    delta = merge(deltas, torch.tensor([weights[index] for index, _ in pieces], device=reference.device), pruning)
    delta = delta.t() if transposed else delta
    return _truncated(delta, svd, max(a.shape[0] for _, a, _ in scaled), a_shape, b_shape)


def _truncated(
    delta: torch.Tensor, svd: SvdSettings, largest_rank: int, a_shape: torch.Size, b_shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (V_kᵀ, U_k S_k) of ΔW's SVD, clamped to the `svd.clamp` quantile of their entries."""
    rank = min(svd.rank or largest_rank, *delta.shape)
    left, singular, right = torch.linalg.svd(delta, full_matrices=svd.full_matrices, driver=svd.driver)
    lora_B, lora_A = left[:, :rank] * singular[:rank], right[:rank]
    if svd.clamp is not None:
        bound = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), svd.clamp)
        lora_B, lora_A = lora_B.clamp(-bound, bound), lora_A.clamp(-bound, bound)
    return lora_A.reshape(rank, *a_shape), lora_B.reshape(b_shape[0], rank, *b_shape[2:])
