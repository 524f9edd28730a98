"""Per-step work a method asks of the trainer: a term added to the loss, and work after each optimizer step.

A method class may define `training_hook(delta_model, adapter_name, total_steps) -> StepHook | None`; the
trainer then builds one for each trainable adapter of that method (AdaLoRA: its `RankAllocator`; LoRA:
the regularisers of KaSA and MonteCLoRA adapters, None for other LoRA adapters). Each micro-batch's
loss gets `hook.loss()` added (before the division by the accumulation count, so a step adds it once);
after `optimizer.step()` and before the gradients are zeroed the trainer calls
`hook.after_step(global_step)` with the index of that step, from 0. A hook's `state_dict()` (tensors
only) goes into the checkpoint and back through `load_state_dict`, so `--resume` stays bit-exact.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import DeltaTuneError
from ..model import DeltaModel
from ..registry import method_for


class StepHook(Protocol):
    def loss(self) -> torch.Tensor:
        """A term to add to the training loss (a regulariser)."""

    def after_step(self, global_step: int) -> None:
        """After optimizer step `global_step` (from 0), before the gradients are zeroed."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep for a bit-exact resume."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`."""


def step_hooks(delta_model: DeltaModel, total_steps: int) -> dict[str, StepHook]:
    """{adapter name: its method's step hook} for the trainable adapters whose method declares one."""
    hooks = {}
    for name, config in delta_model.configs.items():
        build = getattr(method_for(config), "training_hook", None)
        if build is not None and any(parameter.requires_grad for parameter in delta_model.adapter_parameters(name)):
            hook = build(delta_model, name, total_steps)
            if hook is not None:  # the method needs no hook for this adapter's settings
                hooks[name] = hook
    return hooks


def extra_loss(hooks: dict[str, StepHook]) -> torch.Tensor | float:
    """The sum of the hooks' loss terms (0 without hooks)."""
    return sum((hook.loss() for hook in hooks.values()), 0.0)


def after_step(hooks: dict[str, StepHook], global_step: int) -> None:
    for hook in hooks.values():
        hook.after_step(global_step)


def hooks_state(hooks: dict[str, StepHook]) -> dict[str, torch.Tensor]:
    """Every hook's state, keyed `<adapter>.<key>`, contiguous (for safetensors)."""
    return {
        f"{name}.{key}": value.contiguous() for name, hook in hooks.items() for key, value in hook.state_dict().items()
    }


def load_hooks_state(hooks: dict[str, StepHook], tensors: dict[str, torch.Tensor]) -> None:
    """Give each hook its part of `tensors` (as `hooks_state` keyed them)."""
    if not tensors and any(hook.state_dict() for hook in hooks.values()):
        raise DeltaTuneError(
            f"the checkpoint holds no step state for adapter {next(iter(hooks))!r} (AdaLoRA's rank budget), so the "
            "run cannot continue exactly; train afresh without --resume"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in hooks}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise DeltaTuneError(f"the checkpoint holds step state of adapter {name!r}, which this run does not train")
        parts[name][rest] = value
    for name, hook in hooks.items():
        hook.load_state_dict(parts[name])
