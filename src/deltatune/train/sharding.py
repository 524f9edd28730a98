"""FSDP2 (`data_parallel: fsdp`): the frozen base and the adapter sharded over the ranks of a run.

`shard` calls `fully_shard` on every transformer block (`architectures.block_names`: the decoder
layer list, both stacks of an encoder-decoder; an adapter config's `architecture` names them where
the site map does not) and then on the base model, which takes what lies
outside the blocks (embeddings, final norm, head). Every parameter becomes a `DTensor` sharded on
dim 0: rank r keeps rows [r·⌈n/R⌉, (r+1)·⌈n/R⌉) of an n-row weight, R ranks. A block's weights are
all-gathered just before it runs and freed after, its gradients reduce-scattered (averaged) after
its backward; frozen and trainable weights share a block, as FSDP2 allows (sharding is per
parameter), and only the trainable ones get gradients. The adapter lives in a child of the module it
adapts (`site.py`), so it is sharded, gathered and freed with its block.

The base model, not the `DeltaModel`, is the root: transformers' `generate` calls the base model's
forward itself, which then gathers the root's weights too; and transformers, seeing an FSDP-managed
model, keeps every rank stepping until all have finished (`synced_gpus`), so ranks never wait on
each other's collectives. Every gather here is a collective: every rank calls it, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from ..architectures import block_names
from ..errors import DeltaTuneError
from ..site import DeltaSite

try:  # torch ≥ 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # torch 2.4 and 2.5
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard
try:  # torch ≥ 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor, distribute_tensor


def shard(delta_model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `delta_model` in place over all ranks on `device` (blocks first, then the base model);
    returns it. Parameters on the CPU move to `device` one block at a time."""
    base = delta_model.base_model
    named = [getattr(config, "architecture", None) for config in delta_model.configs.values()]
    try:
        blocks = block_names(base, next((architecture for architecture in named if architecture), None))
    except DeltaTuneError as error:
        raise DeltaTuneError(
            f"data_parallel=fsdp shards the model by transformer block and found none ({error}); use "
            "data_parallel=ddp for this model"
        ) from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name in blocks:
        fully_shard(base.get_submodule(name), mesh=mesh)
    fully_shard(base, mesh=mesh)
    return delta_model


@contextlib.contextmanager
def no_sync(delta_model: nn.Module) -> Iterator[None]:
    """Gradients of the micro-batches run inside stay whole on each rank, summed there; the next
    backward outside reduce-scatters the sum (as DDP's `no_sync`)."""
    root: FSDPModule = delta_model.base_model
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather) from a shard; any other tensor as it is."""
    return tensor.full_tensor().detach() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor`, a whole tensor of `like`'s shape, sharded as the shard `like` is (rank 0's values
    scattered); any other tensor as it is."""
    if isinstance(like, DTensor) and tensor.shape == like.shape:
        return distribute_tensor(tensor.detach().to(like.device), like.device_mesh, like.placements)
    return tensor


def copy_whole_into(parameter: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy the whole tensor `tensor` into `parameter` in place (into its shard, if sharded)."""
    with torch.no_grad():
        parameter.copy_(shard_like(tensor, parameter))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite, on every rank (one all-reduce if any is a shard)."""
    if not tensors:
        return True
    shards = [tensor.to_local() if isinstance(tensor, DTensor) else tensor for tensor in tensors]
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in shards]).all().to(torch.int32)
    if any(isinstance(tensor, DTensor) for tensor in tensors):
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


@contextlib.contextmanager
def whole_adapter(model: nn.Module) -> Iterator[None]:
    """Inside, every sharded parameter that trains or belongs to an adapter (`DeltaSite`) is a whole
    tensor in its module, on every rank, so that `DeltaModel.save` and the checkpoints write what a
    single-process run writes; the shards are put back on leaving. The frozen base stays sharded.
    Every FSDP module is resharded first (FSDP's own `state_dict` hook would register the shards
    again in a module left gathered). No forward or backward may run inside."""
    for module in model.modules():  # a root left gathered by a forward in no_grad: its shards back first
        if isinstance(module, FSDPModule):
            module.reshard()
    adapter_modules = {
        id(module) for site in model.modules() if isinstance(site, DeltaSite) for module in site.modules()
    }
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    wholes: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if isinstance(parameter, DTensor) and (parameter.requires_grad or id(module) in adapter_modules):
                    if id(parameter) not in wholes:
                        wholes[id(parameter)] = nn.Parameter(full(parameter), parameter.requires_grad)
                    swapped.append((module, name, parameter))
                    module._parameters[name] = wholes[id(parameter)]
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter
