"""A model built without its parameters' storage: inside `parameters_on_meta()` every parameter a module
registers goes to the meta device (a shape and dtype, no memory), while buffers (rotary frequencies,
position ids) are made as usual. The loader then puts the file's tensors in place; a quantized layer
replaces its float skeleton whole, so no float copy of its weight is ever allocated.

torch's layers (`nn.Linear`, `nn.Embedding`, `nn.LayerNorm`...) make their parameters from `torch.empty`, which
inside gives meta tensors, so not even an untouched allocation of them is tried (a hostile size would ask for
terabytes). The few parameters made otherwise (transformers' RMS norms, from `torch.ones`: one vector each)
are made and then moved. Buffers never come from `torch.empty`, which would leave them without values."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` without a device gives a meta tensor."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While inside (one thread building a model), parameters are registered on the meta device."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        if parameter is not None and parameter.device.type != "meta":
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` still without storage."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in tensors if tensor.is_meta]
