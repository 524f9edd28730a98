"""AdaLoRA's rank budget: importance scores, the cubic budget schedule, and masking (peft 0.21's rules).

Importance of each entry of A, E and B (Zhang et al. 2023, eqs. 8-10), after every optimizer step:

    I = |p ⊙ ∂L/∂p|                       sensitivity (p after the step, ∂L/∂p of the step)
    Ī ← β₁ Ī + (1 − β₁) I                 smoothed sensitivity
    Ū ← β₂ Ū + (1 − β₂) |I − Ī|           uncertainty
    S = Ī ⊙ Ū                             score of the entry

A triplet i (row i of A, E_i, column i of B) scores S(E_i) + mean_j S(A_ij) + mean_j S(B_ji). The budget
b(t) (triplets kept over all modules) is init_r·n until `tinit`, then falls as

    b(t) = ⌊(b₀ − b_T) (1 − (t − tinit) / (total_step − tfinal − tinit))³ + b_T⌋,   b_T = target_r·n

and every `deltaT` steps the triplets with a score at or below the (b₀ − b)-th smallest have their E set
to zero (they may grow back before the next allocation). At step total_step − tfinal the last allocation
fixes the mask, the scores are dropped, and every later step zeroes the masked E again. Each allocation
records the kept flags in the adapter's `rank_pattern`, which a save uses to keep only those triplets.

The orthogonality regulariser (`orthogonal_loss`) is orth_reg_weight times the mean over every A and B of
‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (peft's form: the norm, not its square).

In a loop of your own (`deltatune train` does this by itself):

    allocator = deltatune.RankAllocator(delta_model)          # config.total_step must be set
    for step, batch in enumerate(batches):
        loss = delta_model(**batch).loss + allocator.orthogonal_loss()
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(step)                    # after the step, before zero_grad
        optimizer.zero_grad()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointMismatchError, DeltaTuneError
from .adalora import AdaLoraConfig, SvdLinear, check_schedule

if TYPE_CHECKING:
    from ..model import DeltaModel

FACTORS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """The rank budget of AdaLoRA adapter `name` of `delta_model` (module docstring). peft's
    `update_and_allocate(global_step)`, with the global step counted from 0 as in peft's examples.
    `state_dict()` / `load_state_dict()` carry the scores and the kept flags through a checkpoint."""

    def __init__(self, delta_model: DeltaModel, name: str = "default", default_total_step: int | None = None) -> None:
        delta_model.require([name])
        config = delta_model.configs[name]
        if not isinstance(config, AdaLoraConfig):
            raise DeltaTuneError(f"adapter {name!r} is {config.method}, not adalora; a RankAllocator needs AdaLoRA")
        if config.total_step is None:
            if default_total_step is None:
                raise DeltaTuneError(
                    f"adapter {name!r} has no total_step, which AdaLoRA's budget schedule needs; set total_step in "
                    "its AdaLoraConfig to the number of optimizer steps you will take"
                )
            check_schedule(config, default_total_step)
            delta_model.replace_config(name, config.replace(total_step=default_total_step))
        self.delta_model = delta_model
        self.name = name
        self.modules = svd_modules(delta_model, name)
        pruned = [module_name for module_name, adapter in self.modules.items() if adapter.rank != self.config.init_r]
        if pruned:
            kept = self.modules[pruned[0]].rank
            raise DeltaTuneError(
                f"adapter {name!r} was pruned by an earlier budget ({pruned[0]} keeps {kept} of {self.config.init_r} "
                "triplets); the schedule starts from init_r triplets per module: train it further without a "
                "RankAllocator, or start a fresh adapter"
            )
        self.initial_budget = sum(adapter.rank for adapter in self.modules.values())
        self.target_budget = self.config.target_r * len(self.modules)
        self.smoothed: dict[str, torch.Tensor] = {}
        """Ī per factor, keyed `<module>.<factor>`."""
        self.uncertainty: dict[str, torch.Tensor] = {}
        """Ū per factor, keyed as `smoothed`."""

    @property
    def config(self) -> AdaLoraConfig:
        return self.delta_model.configs[self.name]

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets kept, whether step `step` allocates) by the schedule."""
        config = self.config
        if step <= config.tinit:
            return self.initial_budget, False
        end = config.total_step - config.tfinal
        if step > end:
            return self.target_budget, True
        remaining = 1 - (step - config.tinit) / (end - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % config.deltaT == 0

    def update_and_allocate(self, global_step: int) -> None:
        """After `optimizer.step()` and before the gradients are zeroed: update the scores, mask to the
        step's budget when it allocates, fix the mask at total_step − tfinal, keep it fixed after."""
        end = self.config.total_step - self.config.tfinal
        if global_step < end:
            self.update_importance()
            budget, allocates = self.budget(global_step)
            if allocates:
                self.record(self.mask_to_budget(budget))
        elif global_step == end:
            self.record(self.mask_to_budget(self.budget(global_step)[0]))
            self.smoothed, self.uncertainty = {}, {}
        else:
            self.apply_pattern()

    def update_importance(self) -> None:
        """Ī and Ū of every entry of A, E and B from this step's gradients."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for module_name, adapter in self.modules.items():
                for factor in FACTORS:
                    parameter = getattr(adapter, factor)
                    if parameter.grad is None:
                        raise DeltaTuneError(
                            f"{module_name}.{factor} has no gradient: call update_and_allocate after backward() "
                            "and before the optimizer zeroes the gradients"
                        )
                    key = f"{module_name}.{factor}"
                    sensitivity = (parameter * parameter.grad).abs()
                    smoothed = self.smoothed.get(key, torch.zeros_like(parameter))
                    uncertainty = self.uncertainty.get(key, torch.zeros_like(parameter))
                    self.smoothed[key] = beta1 * smoothed + (1 - beta1) * sensitivity
                    self.uncertainty[key] = beta2 * uncertainty + (1 - beta2) * (sensitivity - self.smoothed[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module: score of each triplet} (rank values): S(E_i) + mean S(A_i·) + mean S(B_·i)."""
        scores = {}
        for module_name in self.modules:
            score_a, score_b, score_e = (self._score(f"{module_name}.{factor}") for factor in FACTORS)
            vectors = score_a.mean(dim=1) + score_b.mean(dim=0)
            scores[module_name] = score_e.view(-1) + vectors
        return scores

    def _score(self, key: str) -> torch.Tensor:
        if key not in self.smoothed:
            raise DeltaTuneError(
                "no importance scores yet: call update_and_allocate at every step from the first, after backward()"
            )
        return self.smoothed[key] * self.uncertainty[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E of every triplet scoring at or below the (b₀ − budget)-th smallest score; the kept
        flags per module."""
        scores = self.triplet_scores()
        pruned = self.initial_budget - budget
        if pruned <= 0:
            return {module_name: [True] * len(score) for module_name, score in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned)[0].item()
        pattern = {}
        with torch.no_grad():
            for module_name, score in scores.items():
                masked = score <= threshold
                self.modules[module_name].lora_E.masked_fill_(masked.view(-1, 1), 0.0)
                pattern[module_name] = (~masked).tolist()
        return pattern

    def record(self, pattern: dict[str, list[bool]]) -> None:
        """Make `pattern` the adapter's `rank_pattern` (its config, and the triplets its saves keep)."""
        record_rank_pattern(self.delta_model, self.name, pattern)

    def apply_pattern(self) -> None:
        """Zero the E of the triplets the fixed pattern masks (every step after the last allocation)."""
        pattern = self.config.rank_pattern
        if pattern is None:
            raise DeltaTuneError(
                "the budget schedule has ended but no rank pattern was allocated: call update_and_allocate at "
                "every step from 0, through step total_step − tfinal"
            )
        with torch.no_grad():
            for module_name, kept in pattern.items():
                lora_E = self.modules[module_name].lora_E
                lora_E.masked_fill_(~torch.tensor(kept, device=lora_E.device).view(-1, 1), 0.0)

    def orthogonal_loss(self) -> torch.Tensor:
        """orth_reg_weight · mean over every A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F, to add to the loss."""
        norms = []
        for adapter in self.modules.values():
            for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
                identity = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                norms.append(torch.norm(gram - identity, p="fro"))
        return self.config.orth_reg_weight * (sum(norms) / len(norms))

    # The trainer's step hook (`deltatune.train.step_hooks`).
    def loss(self) -> torch.Tensor:
        return self.orthogonal_loss()

    def after_step(self, global_step: int) -> None:
        self.update_and_allocate(global_step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The scores (`smoothed.<key>`, `uncertainty.<key>`) and the kept flags (`kept.<module>`)."""
        state = {f"smoothed.{key}": value for key, value in self.smoothed.items()}
        state.update({f"uncertainty.{key}": value for key, value in self.uncertainty.items()})
        for module_name, kept in (self.config.rank_pattern or {}).items():
            state[f"kept.{module_name}"] = torch.tensor(kept)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (the adapter's weights come separately)."""
        tables = {"smoothed": {}, "uncertainty": {}, "kept": {}}
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            if kind not in tables:
                raise DeltaTuneError(f"the saved AdaLoRA state holds an unknown entry {key!r}; it is from another run")
            tables[kind][rest] = value
        device = next(iter(self.modules.values())).lora_A.device
        self.smoothed = {key: value.to(device) for key, value in tables["smoothed"].items()}
        self.uncertainty = {key: value.to(device) for key, value in tables["uncertainty"].items()}
        if tables["kept"]:
            self.record({module_name: value.tolist() for module_name, value in tables["kept"].items()})


def record_rank_pattern(delta_model: DeltaModel, name: str, pattern: dict[str, list[bool]] | None) -> None:
    """Make `pattern` (None: every triplet) the `rank_pattern` of AdaLoRA adapter `name`, whose modules hold
    init_r triplets: its config, and the triplets its saves keep. A resume takes a checkpoint's pattern so."""
    config = delta_model.configs[name]
    modules = svd_modules(delta_model, name)
    pruned = next((module_name for module_name, adapter in modules.items() if adapter.rank != config.init_r), None)
    if pruned is not None:
        raise CheckpointMismatchError(
            f"adapter {name!r} was built pruned to its rank_pattern ({pruned} keeps {modules[pruned].rank} of "
            f"{config.init_r} triplets), so it cannot take another pattern: attach it afresh from a config "
            "without rank_pattern, or load the folder with deltatune.load"
        )
    for module_name, adapter in modules.items():
        kept = None if pattern is None else pattern.get(module_name)
        adapter.kept = None if kept is None else list(kept)
    delta_model.replace_config(name, config.replace(rank_pattern=pattern))


def svd_modules(delta_model: DeltaModel, name: str) -> dict[str, SvdLinear]:
    """The AdaLoRA layers of adapter `name`, by module name."""
    return {
        module_name: site.adapters[name]
        for module_name, site in delta_model.sites()
        if name in site.adapters and isinstance(site.adapters[name], SvdLinear)
    }
