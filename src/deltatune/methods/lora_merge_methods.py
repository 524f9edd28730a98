"""Merging task tensors τ_1..τ_n (LoRA factors, or the ΔW of each adapter) with weights w_1..w_n.

- linear: τ = Σ w_i τ_i (task arithmetic).
- magnitude_prune: each τ_i keeps its ⌊density · numel⌋ entries of largest |τ_i| (others 0); then Σ w_i τ̂_i.
- ties (TIES-Merging, Yadav et al. 2023, arXiv:2306.01708): trim as magnitude_prune; elect per entry the
  sign γ = sgn(Σ_i τ̂_i) ("total") or sgn(Σ_i sgn τ̂_i) ("frequency"), with γ = +1 on a tie; disjoint
  mean τ = Σ_{i: sgn τ̂_i = γ} w_i τ̂_i / max(1, |{i: sgn τ̂_i = γ}|). The election reads the unweighted
  τ̂_i and pruned (zero) entries never count, as in peft.
- dare_linear / dare_ties (DARE, Yu et al. 2023, arXiv:2311.03099): drop entries at random, keeping each
  with probability `density`, and rescale the kept ones by 1 / density; then linear / TIES's election
  and disjoint mean. The masks come from `torch.bernoulli` on the global generator of the tensor's
  device, one draw per task tensor in order, of the tensor's shape, at the probability stored in
  `draw_dtype` (the adapter's dtype): the same draws as peft's, so the same seed gives the same masks.

A density of 1 prunes nothing and draws nothing (peft's rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Pruning:
    """How a merge prunes: the fraction of entries kept, the sign election, the masks' dtype."""

    density: float = 1.0
    majority_sign_method: str = "total"
    draw_dtype: torch.dtype = torch.float32


def weighted_tasks(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_i τ_i for the tasks stacked on dimension 0."""
    return tasks * weights.view(-1, *(1,) * (tasks.dim() - 1))


def weighted_sum(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i τ_i over the stacked tasks."""
    return weighted_tasks(tasks, weights).sum(dim=0)


def keep_largest(task: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its ⌊density · numel⌋ entries of largest magnitude set to 0."""
    if density >= 1:
        return task
    kept = torch.zeros(task.numel(), dtype=task.dtype, device=task.device)
    kept[torch.topk(task.abs().flatten(), k=int(density * task.numel())).indices] = 1
    return task * kept.view_as(task)


def keep_random(task: torch.Tensor, density: float, draw_dtype: torch.dtype) -> torch.Tensor:
    """τ · m / density with m_j ~ Bernoulli(density), drawn from the global generator."""
    if density >= 1:
        return task
    mask = torch.bernoulli(torch.full(task.shape, density, dtype=draw_dtype, device=task.device))
    return task * mask.to(task.dtype) / density


def disjoint_mean(tasks: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES's elected sign and disjoint mean of the weighted tasks (see the module's docstring)."""
    signs = tasks.sign()
    votes = tasks.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)
    total = (weighted_tasks(tasks, weights) * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def _linear(tasks: list[torch.Tensor], weights: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    return weighted_sum(torch.stack(tasks), weights)


def _magnitude_prune(tasks: list[torch.Tensor], weights: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    return weighted_sum(torch.stack([keep_largest(task, pruning.density) for task in tasks]), weights)


def _ties(tasks: list[torch.Tensor], weights: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    trimmed = torch.stack([keep_largest(task, pruning.density) for task in tasks])
    return disjoint_mean(trimmed, weights, pruning.majority_sign_method)


def _dare_linear(tasks: list[torch.Tensor], weights: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    dropped = [keep_random(task, pruning.density, pruning.draw_dtype) for task in tasks]
    return weighted_sum(torch.stack(dropped), weights)


def _dare_ties(tasks: list[torch.Tensor], weights: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    dropped = torch.stack([keep_random(task, pruning.density, pruning.draw_dtype) for task in tasks])
    return disjoint_mean(dropped, weights, pruning.majority_sign_method)


MERGES: dict[str, Callable[[list[torch.Tensor], torch.Tensor, Pruning], torch.Tensor]] = {
    "linear": _linear,
    "magnitude_prune": _magnitude_prune,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
}
"""{merge name: merge(tasks, weights, pruning) -> merged tensor}."""
PRUNING_MERGES = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
