"""The method contract, and the shared machinery of methods whose delta sits on chosen modules.

A method is any class with a `config_class` and one function (a `typing.Protocol`, no base class
needed):

    attach(placement, config) -> None     # build adapters, put each at a module: placement.put(name, adapter)

`@deltatune.register("name")` makes it available by name. `DeltaModel.add` makes the `Placement`
(`deltatune.placement`), which records the targets, opens the modules' sites, says whether the weights
will come from a file (`placement.weights_from_file`: skip an initialisation that needs data) and undoes
everything when the add fails. `DeltaModel` owns the rest: `modules_to_save` copies, removal (each
adapter's `SiteAdapter.close()` runs as it leaves its site), activation, and merging: an adapter module
that can be folded into the weights has `delta_parameters(module) -> {"weight": ΔW, ...}` (float32, in
the layout of the module's own parameters), and `DeltaModel.merge()` adds those deltas.

A method whose training needs work at every step (AdaLoRA's rank budget, MonteCLoRA's regulariser) also
defines `training_hook(delta_model, name, total_steps)`, which `deltatune train` calls for each trainable adapter
of the method (`deltatune.train.step_hooks` says what the hook it returns does).

A method that trains the base's own weights rather than a delta (full fine-tuning) sets
`trains_base = True`: `DeltaModel` then refuses what needs the untouched base (`disabled()`, mixed
batches, `unload(merge=False)`).

`ModuleMethod` is the base for methods that put one adapter module on each selected module. A subclass
gives `config_class`, a dispatch table `adapter_types` ({layer type: adapter class}) and, if it has
defaults, a table `targets_by_model_type` ({model type: target names}) or its own `default_targets(model)`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..config import DeltaConfig, TargetedConfig
from ..errors import TargetNotFoundError
from ..placement import Placement
from ..targeting import select_modules


@runtime_checkable
class Method(Protocol):
    """What `register` expects of a method class."""

    config_class: type[DeltaConfig]

    def attach(self, placement: Placement, config: DeltaConfig) -> None:
        """Build adapter `placement.name`'s site adapters for `placement.model` and put each at its
        module (`placement.put`); raise `DeltaTuneError` on a model the config does not fit."""


class ModuleMethod:
    """One adapter module per selected module, chosen from `adapter_types` by the module's type."""

    config_class: type[TargetedConfig] = TargetedConfig
    adapter_types: dict[type | str, type[nn.Module]] = {}

    targets_by_model_type: dict[str, list[str]] = {}
    """The default `target_modules` per `config.model_type` (peft's table for the method); a model type
    not in it needs `target_modules`."""

    def default_targets(self, model: nn.Module) -> list[str] | str:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in self.targets_by_model_type:
            return self.targets_by_model_type[model_type]
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
        """The table's types (a type named by a string is found through its base class: quantized linears
        are `nn.Linear`s)."""
        return tuple(key for key in self.adapter_types if isinstance(key, type))

    def select(self, model: nn.Module, config: TargetedConfig) -> list[str]:
        """Full names of the modules that get an adapter."""
        return select_modules(model, config, self.supported_types(), self.default_targets)

    def attach(self, placement: Placement, config: TargetedConfig) -> None:
        model = placement.model
        built = {
            target: self.build_adapter(model.get_submodule(target), target, config)
            for target in self.select(model, config)
        }
        for target, adapter in built.items():
            placement.put(target, adapter)


_NO_DEFAULT = object()


def type_name(module_type: type) -> str:
    """A type's dotted name ("bitsandbytes.nn.modules.Linear4bit"), as tables name types of optional packages."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def lookup_type(table: dict[type | str, Any], module_type: type, default: Any = _NO_DEFAULT) -> Any:
    """Dispatch on a type or its nearest base class in the table. A key may be a type or its dotted
    name (`type_name`): a table can name a type of an optional package without importing it."""
    for base in module_type.__mro__:
        if base in table:
            return table[base]
        name = type_name(base)
        if name in table:
            return table[name]
    if default is _NO_DEFAULT:
        raise KeyError(module_type)
    return default
