"""Parameter counts of a `DeltaModel`: what trains, what is frozen, how much each adapter weighs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
        total = sum(p.numel() for p in parameters)
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
