"""A term a method's paper adds to the task loss, as `deltatune train`'s step hook (`train/step_hooks.py`).

    loss = task loss + Σ_terms term(model, adapter)

The hook keeps no state: each term reads the adapter's parameters (and, for stochastic layers, the draws
of the forward pass just run, whose generator state the checkpoint keeps), so `--resume` needs nothing
more. Terms: KaSA's `kasa_loss`, MonteCLoRA's `monteclora_loss` (methods/lora.py's `REGULARIZERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import DeltaModel

LossTerm = Callable[["DeltaModel", str], torch.Tensor]


class RegularizerHook:
    """Adds adapter `name`'s loss terms to each micro-batch's loss; nothing after the optimizer step."""

    def __init__(self, delta_model: DeltaModel, name: str, terms: list[LossTerm]) -> None:
        self.delta_model = delta_model
        self.name = name
        self.terms = terms

    def loss(self) -> torch.Tensor:
        values = [term(self.delta_model, self.name) for term in self.terms]
        return torch.stack(values).sum() if len(values) > 1 else values[0]

    def after_step(self, global_step: int) -> None:
        """Nothing after the optimizer step."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""
