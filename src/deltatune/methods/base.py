"""The method contract, and the shared machinery of methods whose delta sits on chosen modules.

A method is any class with a `config_class` and two functions (a `typing.Protocol`, no base class
needed):

    attach(model, name, config, state) -> list[str]   # full names of the modules it adapted
    detach(model, name) -> None

`@deltatune.register("name")` makes it available by name. Merging is generic: an adapter module that
can be folded into the weights has `delta_parameters(module) -> {"weight": ΔW, ...}` (float32, in the
layout of the module's own parameters), and `DeltaModel.merge()` adds those deltas.

`ModuleMethod` is the base for methods that put one adapter module on each selected module. A subclass
gives `config_class`, a dispatch table `adapter_types` ({layer type: adapter class}) and, if it wants
one, `default_targets(model)`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetNotFoundError
from ..site import RoutingState, close_site_if_empty, open_site, site_of
from ..targeting import model_modules, saved_module_names, select_modules
from .module_copy import ModuleCopy


@runtime_checkable
class Method(Protocol):
    """What `register` expects of a method class."""

    config_class: type[DeltaConfig]

    def attach(self, model: nn.Module, name: str, config: DeltaConfig, state: RoutingState) -> list[str]:
        """Add adapter `name` to `model`; return the full names of the modules it adapted."""

    def detach(self, model: nn.Module, name: str) -> None:
        """Remove every trace of adapter `name` from `model`."""


class ModuleMethod:
    """One adapter module per selected module, chosen from `adapter_types` by the module's type."""

    config_class: type[TargetedConfig] = TargetedConfig
    adapter_types: dict[type, type[nn.Module]] = {}

    def default_targets(self, model: nn.Module) -> list[str] | str:
        raise TargetNotFoundError(
            f"{self.config_class.__name__} needs target_modules for this model "
            f"({getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)}): "
            'pass a list of layer names, a regular expression, or "all-linear"'
        )

    def build_adapter(self, module: nn.Module, module_name: str, config: Any) -> nn.Module:
        """The adapter module for one selected module."""
        adapter_class = lookup_type(self.adapter_types, type(module))
        return adapter_class(module, module_name, config)

    def supported_types(self) -> tuple[type, ...]:
        return tuple(self.adapter_types)

    def select(self, model: nn.Module, config: TargetedConfig) -> list[str]:
        """Full names of the modules that get an adapter."""
        return select_modules(model, config, self.supported_types(), self.default_targets)

    def attach(self, model: nn.Module, name: str, config: TargetedConfig, state: RoutingState) -> list[str]:
        targets = self.select(model, config)
        saved = saved_module_names(model, config)
        built = {target: self.build_adapter(model.get_submodule(target), target, config) for target in targets}
        built.update({target: ModuleCopy(model.get_submodule(target)) for target in saved})
        for target, adapter in built.items():
            module = model.get_submodule(target)
            open_site(module, state).add(module, name, adapter)
        return targets

    def detach(self, model: nn.Module, name: str) -> None:
        detach_everywhere(model, name)


def detach_everywhere(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every site of `model` (sites left empty go too)."""
    for _, module in list(model_modules(model)):
        site = site_of(module)
        if site is not None and name in site.adapters:
            del site.adapters[name]
            close_site_if_empty(module)


_NO_DEFAULT = object()


def lookup_type(table: dict[type, Any], module_type: type, default: Any = _NO_DEFAULT) -> Any:
    """Dispatch on a type or its nearest base class in the table."""
    for base in module_type.__mro__:
        if base in table:
            return table[base]
    if default is _NO_DEFAULT:
        raise KeyError(module_type)
    return default
