"""Data-parallel training on PyTorch's own engine: `torch.distributed` + `DistributedDataParallel`.

The trainer reads the variables every launcher sets (`torchrun`, `accelerate launch`, `python -m
torch.distributed.run`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. With WORLD_SIZE > 1
it joins a process group (NCCL on CUDA, gloo on CPU) and wraps the model in DDP, telling DDP to
ignore every frozen parameter: only the adapter's parameters are broadcast from rank 0 at the start
and all-reduced (averaged) after each backward, so every rank holds the same adapter throughout.
Each rank reads its own share of every batch; rank 0 evaluates, logs and writes files.

FSDP (sharding a model too big for one device) is not built into `deltatune train`; from your own
script, shard the `DeltaModel` after attaching the adapter. FSDP2: `fully_shard(block)` for each
transformer block, then `fully_shard(delta_model)`; sharding is per parameter, so a block that holds
frozen weights and adapter weights is fine. FSDP1: `FullyShardedDataParallel(delta_model,
use_orig_params=True, auto_wrap_policy=...)`; `use_orig_params=True` is required for the same reason.
Adapter weights live in a child of the module they adapt, so they shard, gather and checkpoint with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_environment() -> Ranks:
    return Ranks(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(ranks: Ranks, device: torch.device) -> bool:
    """Join the process group of a launched run; True if this call joined it (and should leave it)."""
    if not ranks.distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def stop(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only (frozen ones are neither broadcast nor reduced)."""
    if not ranks.distributed:
        return model
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
