"""Full fine-tuning: every parameter of the base trains, in place; the baseline of any comparison.

    W ← W − η · update(∇W L)      for every parameter W of the model (no delta, no copy)

This is the method a parameter-efficient one is measured against (Houlsby et al. 2019, Hu et al. 2021
report full fine-tuning beside their methods), run through the same trainer, files and CLI. It is not a
delta: the adapter at each module is a view of the module's own parameters (`ModuleWeights`), so the
optimizer updates the base itself, with the memory and compute of plain full fine-tuning (no second
copy of the weights, no extra forward), and the output is the model's own (the adapter passes it
through unchanged, at init and after training alike).

- Saving writes every parameter of the model under its own name (`adapter_model.safetensors` keys are
  the names of `model.named_parameters()`): the whole model's weights. Loading copies them into a fresh
  base. A tensor shared by several modules (an embedding tied to its output head) is held and saved
  once, by the first module that has it.
- Merging is the identity: the weights already are the trained ones.
- What a delta keeps and this method cannot is the base. `disabled()`, mixed batches (rows routed to the
  base or to other adapters) and `unload(merge=False)` would silently give the tuned model for the base,
  so `DeltaModel` refuses them (`trains_base`); a second `full` adapter (the same tensors twice) is
  refused too, and a quantized base, whose packed weights take no gradient.
- A task head the trainer would add to `modules_to_save` trains in place with the rest (no copy).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..config import DeltaConfig
from ..errors import DeltaTuneError
from ..placement import Placement
from ..quantized import quantized_linear
from ..registry import register
from ..site_adapter import SiteAdapter
from ..targeting import model_modules


@dataclasses.dataclass
class FullConfig(DeltaConfig):
    """Full fine-tuning: no settings; every parameter of the model trains."""

    def validate(self) -> None:
        if self.modules_to_save:
            raise DeltaTuneError(
                "full fine-tuning trains every module in place, so modules_to_save would only add a second copy of "
                f"{self.modules_to_save[0]!r}; leave modules_to_save out"
            )


class ModuleWeights(SiteAdapter):
    """A view of a module's own parameters `names`: what trains, saves and loads; the output is unchanged.

    The parameters stay the module's (they are not registered here again, so `state_dict`, `.to()` and
    sharding see each tensor once, under its module); `parameters()` yields them for `DeltaModel`."""

    keeps_module_dtype = True
    delta_reads_module = False

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self._module = weakref.ref(module)
        self.names = names

    def held(self) -> dict[str, nn.Parameter]:
        """{name in the module: the module's parameter}, looked up now (a parameter replaced by
        `.to()` or `load_state_dict(assign=True)` is the new one)."""
        module = self._module()
        return {name: module._parameters[name] for name in self.names}

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, parameter in self.held().items():
            yield prefix + name, parameter

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def file_state(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in self.held().items()}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        held = self.held()
        if set(tensors) != set(held):
            raise DeltaTuneError(f"full fine-tuning weights: expected {sorted(held)}, got {sorted(tensors)}")
        with torch.no_grad():
            for name, parameter in held.items():
                parameter.copy_(tensors[name])

    def extra_repr(self) -> str:
        return f"weights of the module: {', '.join(self.names)}"


@register("full")
class Full:
    """Train every parameter of the base model in place (see the module docstring)."""

    config_class = FullConfig
    trains_base = True
    """The base's own weights train: `DeltaModel` refuses what needs the untouched base, and the trainer
    adds no `modules_to_save` copy of a task head (it trains in place)."""

    def attach(self, placement: Placement, config: FullConfig) -> None:
        model = placement.model
        seen: set[int] = set()
        owned: list[tuple[str, nn.Module, list[str]]] = []
        for module_name, module in model_modules(model):
            refuse_quantized(module_name, module)
            names = [
                name
                for name, parameter in module._parameters.items()
                if parameter is not None and id(parameter) not in seen
            ]
            seen.update(id(module._parameters[name]) for name in names)
            if names:
                owned.append((module_name, module, names))
        if not owned:
            raise DeltaTuneError("full fine-tuning found no parameter in the model to train")
        for module_name, adapters in placement.adapters_at():
            held = next((name for name, adapter in adapters.items() if isinstance(adapter, ModuleWeights)), None)
            if held is not None:
                raise DeltaTuneError(
                    f"adapter {held!r} already fine-tunes every weight of this model (at {module_name or 'its root'}): "
                    "a model holds one full fine-tuning adapter; delete it first, or attach to a fresh base"
                )
        for module_name, module, names in owned:
            placement.put(module_name, ModuleWeights(module, names))


def refuse_quantized(module_name: str, module: nn.Module) -> None:
    """Refuse a module whose weights cannot train: a quantized layer (packed weights, or GGUF blocks that
    are buffers) or a parameter that is not floating point."""
    row = quantized_linear(module)
    parameters = module._parameters.items()
    integer = next((name for name, p in parameters if p is not None and not p.is_floating_point()), None)
    if row is None and integer is None:
        return
    what = f"a quantized layer ({row.describe(module)})" if row is not None else f"an integer parameter {integer!r}"
    raise DeltaTuneError(
        f"full fine-tuning cannot train {module_name or 'the model'}: it holds {what}; load the base in full "
        "precision (no quantize), or train an adapter (LoRA, BitFit) on the quantized base"
    )
