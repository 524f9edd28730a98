"""How active adapters combine, as plain data: `Stack`, `Fuse` and AdapterDrop's skipped layers.

    Stack("a", "b")   at each site a runs, then b on a's result: h ← h + A_a(h); h ← h + A_b(h + A_a(h))
    Fuse("a", "b")    the fusion layer trained over a and b runs (methods/fusion.py)
    skip_layers       adapters of these blocks do not run (AdapterDrop, Rücklé et al. 2021, arXiv:2010.11918)

`activate()` turns a setup into the ordered names each site runs once (`site_names`), so a forward
call does no composition work. `activate("a", "b")` means `Stack("a", "b")`. For training, AdapterDrop
also skips the adapters of a random number of lowest layers on every forward call
(`train_skip_lowest`); that re-selects the active adapters of the sites, once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DeltaTuneError
from .site import DeltaSite


@dataclass(frozen=True, init=False)
class Fuse:
    """AdapterFusion over trained adapters; the fusion layers come from `DeltaModel.fuse(...)`."""

    adapters: tuple[str, ...]

    def __init__(self, *adapters: str) -> None:
        if len(adapters) < 2 or not all(isinstance(name, str) for name in adapters):
            raise DeltaTuneError(f"Fuse needs two or more adapter names, got {adapters!r}")
        object.__setattr__(self, "adapters", tuple(adapters))

    def to_dict(self) -> dict[str, Any]:
        return {"fuse": list(self.adapters)}


@dataclass(frozen=True, init=False)
class Stack:
    """Adapters (or fusions) applied one after the other at every site."""

    children: tuple[str | Fuse, ...]

    def __init__(self, *children: str | Fuse) -> None:
        if not children or not all(isinstance(child, (str, Fuse)) for child in children):
            raise DeltaTuneError(f"Stack takes adapter names or Fuse(...) blocks, got {children!r}")
        object.__setattr__(self, "children", tuple(children))

    def to_dict(self) -> dict[str, Any]:
        return {"stack": [child if isinstance(child, str) else child.to_dict() for child in self.children]}


Setup = str | Stack | Fuse


def setup_from_dict(data: Any) -> Setup:
    """Inverse of `to_dict` (a plain string is an adapter name)."""
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and set(data) == {"fuse"}:
        return Fuse(*data["fuse"])
    if isinstance(data, dict) and set(data) == {"stack"}:
        return Stack(*(setup_from_dict(child) for child in data["stack"]))
    raise DeltaTuneError(f"not a composition: {data!r}; expected a name, {{'stack': [...]}} or {{'fuse': [...]}}")


def site_names(setup: tuple[Setup, ...], fusion_name: Callable[[Fuse], str]) -> tuple[str, ...]:
    """The adapter names a site runs, in order, for a setup (`fusion_name` finds a Fuse's layer)."""
    resolve: dict[type, Callable[[Any], tuple[str, ...]]] = {
        str: lambda name: (name,),
        Fuse: lambda fuse: (fusion_name(fuse),),
        Stack: lambda stack: site_names(stack.children, fusion_name),
    }
    names: tuple[str, ...] = ()
    for item in setup:
        if type(item) not in resolve:
            raise DeltaTuneError(f"activate() takes adapter names, Stack(...) or Fuse(...), got {item!r}")
        names += resolve[type(item)](item)
    return names


@dataclass
class ActivePlan:
    """Which adapters each site runs: `names`, except in skipped layers (`layers` gives each site's
    layer, None outside blocks)."""

    names: tuple[str, ...]
    sites: list[tuple[DeltaSite, int | None]]
    skip_layers: frozenset[int] = frozenset()
    train_skip_lowest: int = 0
    _lowest: int = field(default=-1, repr=False)

    def apply(self, lowest: int = 0) -> None:
        """Set every site's active adapters, also skipping layers below `lowest`."""
        for site, layer in self.sites:
            skipped = layer is not None and (layer in self.skip_layers or layer < lowest)
            site.set_active(self.names, skipped)
        self._lowest = lowest

    def before_call(self, training: bool) -> None:
        """AdapterDrop in training: skip the adapters of a random number (0..train_skip_lowest) of the
        lowest layers for this call; in eval, only `skip_layers`."""
        lowest = int(torch.randint(0, self.train_skip_lowest + 1, ())) if training else 0
        if lowest != self._lowest:
            self.apply(lowest)
