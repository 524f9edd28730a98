"""Data-parallel training on PyTorch's own engine: `torch.distributed` with DDP or FSDP2.

The trainer reads the variables every launcher sets (`torchrun`, `accelerate launch`, `python -m
torch.distributed.run`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. With WORLD_SIZE > 1
it joins a process group (NCCL on CUDA, gloo on CPU) and shares the model as `data_parallel` says:

- `ddp` (the default): every rank holds the whole model; `DistributedDataParallel` ignores every
  frozen parameter, so only the adapter's parameters are broadcast from rank 0 at the start and
  all-reduced (averaged) after each backward. Rank 0 evaluates, logs and writes files.
- `fsdp`: FSDP2's `fully_shard` over each transformer block and then the base model
  (`sharding.py`), for a model that does not fit one device: each rank keeps 1/WORLD_SIZE of every
  weight, frozen base and adapter alike. Every rank runs each evaluation (the same batches: a
  forward pass needs every rank's shards); rank 0 logs it and writes the files, which hold whole
  tensors (gathered from the shards first), the same files a single-process run writes.

Either way each rank reads its own share of every batch and ends with the same adapter, and the
gradient of a step is the mean over all ranks' examples: the same step, up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import sharding


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
    """Join the process group of a launched run; True if this call joined it (and should leave it).
    A CUDA `device` becomes the process's current device: FSDP and the collectives place tensors there."""
    if not ranks.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def stop(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


@dataclass(frozen=True)
class DataParallel:
    """One way of sharing the model between the ranks of a run."""

    wrap: Callable[[nn.Module, torch.device], nn.Module]
    """The model each rank trains: a wrapper around the DeltaModel, or the DeltaModel changed in place."""
    no_sync: Callable[[nn.Module], contextlib.AbstractContextManager]
    """Keeps the gradients of a micro-batch on its rank (summed there; reduced with the step's last)."""
    sharded: bool
    """Whether each rank holds only shards of the weights, so every forward pass needs every rank."""


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only (frozen ones are neither broadcast nor reduced)."""
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


DATA_PARALLEL: dict[str, DataParallel] = {
    "ddp": DataParallel(_ddp, lambda model: model.no_sync(), sharded=False),
    "fsdp": DataParallel(sharding.shard, sharding.no_sync, sharded=True),
}
"""The `data_parallel` settings of the training config."""


def wrap(model: nn.Module, ranks: Ranks, device: torch.device, data_parallel: str) -> nn.Module:
    """The model to train on this rank: `model` itself in a single process."""
    return DATA_PARALLEL[data_parallel].wrap(model, device) if ranks.distributed else model


def accumulate(model: nn.Module, ranks: Ranks, data_parallel: str, last: bool) -> contextlib.AbstractContextManager:
    """Where a micro-batch's backward runs: unless it is the step's `last` (or the run has one process),
    its gradients stay on this rank, summed with the next ones; the last one's backward reduces the sum."""
    if last or not ranks.distributed:
        return contextlib.nullcontext()
    return DATA_PARALLEL[data_parallel].no_sync(model)


def sharded(ranks: Ranks, data_parallel: str) -> bool:
    """Whether each rank holds only shards of the weights: then every rank takes part in every
    forward pass (evaluation too) and every gather of whole tensors (saves)."""
    return ranks.distributed and DATA_PARALLEL[data_parallel].sharded
