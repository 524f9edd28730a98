"""BD-LoRA: LoRA with a block-diagonal A or B, for multi-LoRA serving without communication between
tensor-parallel shards (peft's `use_bdlora`; peft 0.21 cites no paper for it).

With n blocks, a block-diagonal A (rank × in) holds n blocks of (rank/n) × (in/n) on its diagonal and zeros
elsewhere; a block-diagonal B (out × rank) n blocks of (out/n) × (rank/n):

    A = diag(A₁, …, Aₙ)      B = diag(B₁, …, Bₙ)      ΔW = s · B A

so with the base sharded n ways the way tensor-parallel serving shards it (rows of a column-parallel layer,
columns of a row-parallel one), each shard's LoRA term needs only its own block: no exchange between
devices. Which layers get which (peft's rule): `target_modules_bd_a` / `target_modules_bd_b` list patterns,
each matched as a substring of the full module name; q/k/v, up and gate projections take a block-diagonal
B, o and down projections a block-diagonal A.

Only the blocks are parameters, stacked along the rows as peft saves them: `lora_A.weight` rank × (in/n),
`lora_B.weight` out × (rank/n). The layers (`lora_block_diagonal_layers`) lay them out as the full
block-diagonal factor and run LoRA's own path (dropout, mixed batches, merge): on one device that costs
what a plain LoRA of that rank costs; BD-LoRA's saving is in sharded serving. Init as peft's: a
block-diagonal A Kaiming-uniform (gain √2) over its block's fan-in, a block-diagonal B zero
(`init_lora_weights=False`: random here, for tests; peft keeps such a B at zero). On `nn.Linear` only,
as in peft.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..errors import DeltaTuneError
from ..field_check import PositiveInt, check_fields
from .lora_data_init import settings_from_dict

if TYPE_CHECKING:
    from .lora import LoraConfig


@dataclasses.dataclass
class BdLoraConfig:
    """BD-LoRA's settings; names and defaults follow peft's `BdLoraConfig`."""

    target_modules_bd_a: list[str] | None = None
    """Modules whose A is block-diagonal: each pattern matched as a substring of the full module name
    (row-parallel layers in serving: o_proj, down_proj)."""
    target_modules_bd_b: list[str] | None = None
    """Modules whose B is block-diagonal, matched the same way (column-parallel layers: q/k/v, up, gate)."""
    nblocks: PositiveInt = 1
    """Blocks per block-diagonal factor (the tensor-parallel degree of serving); it must divide the
    rank and the layer's features on the block-diagonal side."""
    match_strict: bool = True
    """Refuse a target module that matches neither list; False: such a module gets a plain LoRA."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BdLoraConfig:
        return settings_from_dict(cls, data, "use_bdlora", "peft's BdLoraConfig fields")

    def __post_init__(self) -> None:
        check_fields(self)
        both = sorted(set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or []))
        if both:
            raise DeltaTuneError(
                f"use_bdlora lists {both} in both target_modules_bd_a and target_modules_bd_b; a layer's A or "
                "its B is block-diagonal, not both: keep each pattern in one list"
            )


PLAIN_INITS = (True, False, "gaussian")
"""The `init_lora_weights` values BD-LoRA takes (peft replaces the factors of any other init, and the base
it rewrote stays rewritten)."""


def check_block_diagonal_options(config: LoraConfig) -> None:
    """Refuse what BD-LoRA does not combine with (peft has no such combination either)."""
    if config.use_bdlora is None:
        return
    clashes = {
        "use_dora=True": config.use_dora,
        "target_parameters": bool(config.target_parameters),
        f"init_lora_weights={config.init_lora_weights!r}": not any(
            config.init_lora_weights is init or config.init_lora_weights == init for init in PLAIN_INITS
        ),
        "lora_bias=True with target_modules_bd_b": config.lora_bias and bool(config.use_bdlora.target_modules_bd_b),
    }
    named = [name for name, clash in clashes.items() if clash]
    if named:
        raise DeltaTuneError(
            f"use_bdlora does not combine with {', '.join(named)}: BD-LoRA is plain LoRA with a block-diagonal A "
            "or B on Linear layers (init True, False or 'gaussian'); drop one of the two"
        )
