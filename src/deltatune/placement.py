"""`Placement`: what `DeltaModel.add` hands a method's `attach`, so that a method only builds adapters.

A method puts each adapter it builds at a module with `placement.put(module_name, adapter)`; the
placement opens the module's site (its hooks) as needed, records the targets and the block index of
each site, and `undo()` takes everything it placed off again when the add fails. `weights_from_file`
says that the adapter's weights are copied in from a file right after attach, so an initialisation
that needs data (prompt tuning's TEXT init needs a tokenizer) is skipped. Sites, hooks and routing
stay inside the library: a method never touches them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn

from .errors import PlacementError
from .site import RoutingState, open_site, remove_adapter, site_of
from .site_adapter import SiteAdapter
from .targeting import model_modules


class Placement:
    """Adapter `name` being added to `model`; made by `DeltaModel.add`, one per add."""

    def __init__(self, model: nn.Module, name: str, routing: RoutingState, weights_from_file: bool = False) -> None:
        self.model = model
        self.name = name
        self.weights_from_file = weights_from_file
        """The weights come from a file right after attach: skip initialisation that needs data."""
        self.targets: list[str] = []
        """Full names of the modules the method adapted (its `put(..., target=True)` calls), in order."""
        self.placed: list[str] = []
        """Every module that got an adapter, targets and `modules_to_save` copies alike."""
        self._routing = routing

    def put(self, module_name: str, adapter: SiteAdapter, target: bool = True, layer: int | None = None) -> None:
        """Put `adapter` at the module `module_name`. `target`: list the module among the adapter's
        targets (False for helpers such as a tap on a sublayer's input); `layer`: the module's block
        index, where the method knows it (AdapterDrop skips by it; otherwise it is found from the model)."""
        module = self.model.get_submodule(module_name)
        site = site_of(module)
        if site is not None and self.name in site.adapters:
            raise PlacementError(
                f"{module_name!r} already holds an adapter {self.name!r}: a method puts one adapter of a name at a "
                "module"
            )
        site = open_site(module, self._routing)
        self.placed.append(module_name)
        site.add(module, self.name, adapter)
        if layer is not None:
            site.layer = layer
        if target:
            self.targets.append(module_name)

    def adapters_at(self) -> Iterator[tuple[str, Mapping[str, SiteAdapter]]]:
        """(full module name, {adapter name: adapter}) for every module that holds adapters already:
        what a method built over other adapters (a fusion) reads."""
        for module_name, module in model_modules(self.model):
            site = site_of(module)
            if site is not None:
                yield module_name, site.adapters

    def undo(self) -> None:
        """Take off everything this placement put (a failed add leaves the model as it was)."""
        for module_name in reversed(self.placed):
            remove_adapter(self.model.get_submodule(module_name), self.name)
        self.placed.clear()
        self.targets.clear()
