"""Parameter counts of a `DeltaModel`: what trains, what is frozen, how much each adapter weighs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .quantized import quantized_linear

if TYPE_CHECKING:
    from .model import DeltaModel


@dataclass(frozen=True)
class TrainableSummary:
    """Counts of parameters (each tensor counted once, tied ones too)."""

    trainable: int
    total: int
    base: int
    per_adapter: dict[str, int]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @classmethod
    def of(cls, delta_model: DeltaModel) -> TrainableSummary:
        parameters = list(delta_model.base_model.parameters())
        per_adapter = {
            name: sum(p.numel() for p in delta_model.adapter_parameters(name)) for name in delta_model.configs
        }
        total = _logical_total(delta_model.base_model)
        return cls(
            trainable=sum(p.numel() for p in parameters if p.requires_grad),
            total=total,
            base=total - sum(per_adapter.values()),
            per_adapter=per_adapter,
        )

    def __str__(self) -> str:
        lines = [f"trainable: {self.trainable:,} of {self.total:,} parameters ({self.trainable_percent:.4f}%)"]
        lines += [f"  adapter {name!r}: {count:,}" for name, count in self.per_adapter.items()]
        return "\n".join(lines)


def _logical_total(model: nn.Module) -> int:
    """Every parameter counted once (tied ones too), a quantized layer's weight by its logical in × out:
    its storage counts packed values (bitsandbytes 4-bit: two per byte) or is a buffer of blocks (GGUF),
    whose one copy may serve two layers (an embedding and its tied head)."""
    counts = {id(parameter): parameter.numel() for parameter in model.parameters()}
    for module in model.modules():
        row = quantized_linear(module)
        if row is not None:
            counts[id(module.weight)] = row.in_features(module) * row.out_features(module)
    return sum(counts.values())
