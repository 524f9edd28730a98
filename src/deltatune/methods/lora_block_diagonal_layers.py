"""BD-LoRA's layers (`lora_block_diagonal`): LoRA on `nn.Linear` whose A or B holds only its diagonal
blocks, laid out as the full block-diagonal factor for LoRA's own forward, mixed batches and merge."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from .lora import LoraAdapter, LoraConfig, LoraLinear


def block_diagonal(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """The n row-stacked blocks of `blocks` ((n·p) × q) laid out on a diagonal: an (n·p) × (n·q) matrix."""
    return torch.block_diag(*blocks.chunk(count, dim=0))


class BlockDiagonalDown(LoraLinear):
    """LoRA on `nn.Linear` with a block-diagonal A: `lora_A` holds its blocks, rank × (in/n)."""

    def __init__(self, module: nn.Linear, module_name: str, config: LoraConfig) -> None:
        self.transposed = False
        self.blocks = config.use_bdlora.nblocks
        LoraAdapter.__init__(
            self, (module.in_features // self.blocks,), (module.out_features,), module_name, config, module.weight
        )

    def reset(self, init: bool | str) -> None:
        super().reset(init)
        if init is not False:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A)  # peft's: gain √2 over the block's fan-in

    def down_projection(self) -> torch.Tensor:
        return block_diagonal(self.lora_A, self.blocks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block-diagonal A of {self.blocks} blocks"


class BlockDiagonalUp(LoraLinear):
    """LoRA on `nn.Linear` with a block-diagonal B: `lora_B` holds its blocks, out × (rank/n)."""

    def __init__(self, module: nn.Linear, module_name: str, config: LoraConfig) -> None:
        self.transposed = False
        self.blocks = config.use_bdlora.nblocks
        LoraAdapter.__init__(
            self, (module.in_features,), (module.out_features,), module_name, config, module.weight, groups=self.blocks
        )

    def up_projection(self) -> torch.Tensor:
        return block_diagonal(self.lora_B, self.blocks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block-diagonal B of {self.blocks} blocks"


SIDES = {"A": ("target_modules_bd_a", BlockDiagonalDown), "B": ("target_modules_bd_b", BlockDiagonalUp)}
"""The factor that may be block-diagonal → (its pattern list in `BdLoraConfig`, its adapter)."""


def build_block_diagonal(module: nn.Module, module_name: str, config: LoraConfig) -> LoraLinear:
    """The LoRA adapter of one target under `use_bdlora`: block-diagonal A or B as the patterns say, or
    (`match_strict=False`, matching neither) a plain LoRA."""
    settings = config.use_bdlora
    if type(module) is not nn.Linear:
        raise UnsupportedModuleError(
            f"use_bdlora is supported on nn.Linear layers only (as in peft), not on {type(module).__name__} "
            f"({module_name}): leave that layer out of target_modules or drop use_bdlora"
        )
    sides = [
        side for side, (field, _) in SIDES.items() if any(p in module_name for p in getattr(settings, field) or [])
    ]
    if len(sides) == 2:
        raise DeltaTuneError(
            f"{module_name} matches both target_modules_bd_a and target_modules_bd_b of use_bdlora; a layer's A "
            "or its B is block-diagonal, not both: make the patterns tell them apart"
        )
    if not sides:
        if settings.match_strict:
            raise DeltaTuneError(
                f"{module_name} matches neither target_modules_bd_a nor target_modules_bd_b of use_bdlora; add a "
                "pattern for it, or set use_bdlora.match_strict=False to give it a plain LoRA"
            )
        return LoraLinear(module, module_name, config)
    side = sides[0]
    features = module.in_features if side == "A" else module.out_features
    rank = config.rank_for(module_name)
    if rank % settings.nblocks or features % settings.nblocks:
        direction = "input" if side == "A" else "output"
        raise UnsupportedModuleError(
            f"BD-LoRA on {module_name} needs nblocks={settings.nblocks} to divide the rank ({rank}) and the "
            f"{features} {direction} features of its block-diagonal {side}: choose another nblocks or r"
        )
    return SIDES[side][1](module, module_name, config)
