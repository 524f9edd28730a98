"""Where deltas meet the model: one `DeltaSite` per adapted module, one forward hook each.

A site is registered as the child `deltatune` of the module it adapts, so adapter weights move, cast
and shard with their module, and the model's own code is never copied or replaced. It holds every
adapter at that module in one `nn.ModuleDict` keyed by adapter name. An adapter module there is a
`SiteAdapter`, called as `adapter(module, args, kwargs, output) -> new output`. One that overrides
`observe` sees the module's inputs on every call (a tap), one that overrides `prepare` rewrites them
before the module runs: the site then registers its single forward pre-hook, shared by all of them.

Per-call state belongs to the call: the pre-hook opens a fresh `CallNote`, hands it to `prepare`, and
the forward hook finishes the output with it; a hook that runs even when the call raised drops it, so
nothing of one call reaches the next. Notes are kept per thread: concurrent calls keep their own.

`RoutingState` is shared by all sites of one `DeltaModel` (internal to the library, not a part of the
method contract): whether all adapters are disabled and, for a mixed batch, which rows go to which
adapter.

The adapter's side of the contract (`SiteAdapter`, its merge and file hooks, the float32 rule on
half-precision models) is in `site_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any

import torch
from torch import nn

from .errors import DeltaTuneError
from .quantized_grad import backward_by_dequantizing, detached_input, rejoin
from .site_adapter import SiteAdapter, leading_tensor

SITE_ATTRIBUTE = "deltatune"


@dataclass
class RoutingState:
    """What the hooks read on every call; written by `DeltaModel`, never per site."""

    disabled: bool = False
    batch_size: int = 0
    row_groups: tuple[tuple[str, torch.Tensor], ...] | None = None
    _rows_cache: dict[tuple[str, torch.device, int], torch.Tensor] = field(default_factory=dict)

    def set_rows(self, adapter_names: list[str | None] | None) -> None:
        """Route row i of the next calls to `adapter_names[i]` (`None`: base model), or clear routing."""
        self._rows_cache.clear()
        if adapter_names is None:
            self.row_groups = None
            return
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name is not None:
                groups.setdefault(name, []).append(row)
        self.batch_size = len(adapter_names)
        self.row_groups = tuple((name, torch.tensor(rows)) for name, rows in groups.items())

    def expanded_rows(self, name: str, input_rows: torch.Tensor, leading: int, device: torch.device) -> torch.Tensor:
        """The rows of adapter `name` (`input_rows`, its rows of the call's input) in a tensor whose batch
        dim is `leading`: the batch, or the batch with each row repeated (generate's beams and return
        sequences) or flattened with its positions (B*T). `DeltaModel` has checked that the names count
        the rows of the call's input."""
        key = (name, device, leading)
        cached = self._rows_cache.get(key)
        if cached is not None:
            return cached
        if leading % self.batch_size:
            raise DeltaTuneError(
                f"adapter_names has {self.batch_size} entries but a layer sees a batch of {leading}; "
                "pass one adapter name per input row"
            )
        repeat = leading // self.batch_size
        expanded = (input_rows[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1).to(device)
        self._rows_cache[key] = expanded
        return expanded


class CallNote:
    """What one call's pre-hook leaves for the forward hook of the same call: steps applied to the
    module's output, in order (trim the virtual positions, take out a cache made for this call)."""

    def __init__(self) -> None:
        self.steps: list[Callable[[Any], Any]] = []
        self.base_input: torch.Tensor | None = None
        """The input the module ran on detached (`quantized_grad`), for the output and the adapters."""

    def then(self, step: Callable[[Any], Any]) -> None:
        self.steps.append(step)

    def finish(self, output: Any) -> Any:
        for step in self.steps:
            output = step(output)
        return output


def _overrides(adapter: SiteAdapter, hook: str) -> bool:
    return getattr(type(adapter), hook) is not getattr(SiteAdapter, hook)


class DeltaSite(nn.Module):
    """All adapters at one module. Its hook applies the active ones to the module's output."""

    def __init__(self, state: RoutingState) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.state = state
        self.layer: int | None = None
        """The block index of the module, recorded at placement by methods that know it (None: found
        from the model when AdapterDrop needs it)."""
        self.active: list[nn.Module] = []
        self.skipped = False
        """AdapterDrop skips this site's block: no adapter runs here, for any row of a mixed batch either."""
        self.observers: list[SiteAdapter] = []
        self.preparing: frozenset[str] = frozenset()
        self.call_enders: list[SiteAdapter] = []
        self.merges: dict[str, dict[str, torch.Tensor] | None] = {}
        """Adapters merged into the module's weights, in merge order, each with the deltas merge added
        when unmerge must subtract exactly those (`delta_reads_module`), else None (recomputed)."""
        self.created_parameters: set[str] = set()
        self.hook_handle: Any = None
        self.pre_hook_handle: Any = None
        """The site's one forward pre-hook, present while an adapter here observes or prepares inputs."""
        self.end_hook_handle: Any = None
        """The hook that runs after every call, even one that raised, while an adapter needs it."""
        self._notes: dict[int, list[CallNote]] = {}
        """The notes of the calls in progress, a stack per thread (calls nest; threads run their own)."""
        self.rejoins_input = False
        """Whether the module is a quantized layer run on its input detached and rejoined to it
        (`quantized_grad`: its library would save the dequantized weight for backward)."""

    def extra_repr(self) -> str:
        return f"active={[self._name_of(a) for a in self.active]}, merged={self.merged}"

    def forward(self, value: Any) -> Any:
        """A container that runs its children in turn (`nn.Sequential`) runs its site too, last: the
        site passes the value through (its work is in the hooks of the module it sits on)."""
        return value

    @property
    def merged(self) -> list[str]:
        """The names of the merged adapters, in merge order."""
        return list(self.merges)

    def _name_of(self, adapter: nn.Module) -> str:
        return next(name for name, held in self.adapters.items() if held is adapter)

    def add(self, module: nn.Module, name: str, adapter: SiteAdapter) -> None:
        """Hold `adapter` under `name`; give `module` the hooks the adapters here need."""
        self.adapters[name] = adapter.train(module.training)
        self._update_hooks(module)

    def remove(self, module: nn.Module, name: str) -> None:
        """Drop adapter `name` (its `close()` runs first) and the hooks no adapter here needs any more."""
        adapter = self.adapters[name]
        try:
            adapter.close()
        finally:
            del self.adapters[name]
            self.active = [held for held in self.active if held is not adapter]
            self._update_hooks(module)

    def _update_hooks(self, module: nn.Module) -> None:
        """Precompute which adapters observe, prepare and end calls; register or remove hooks to match."""
        held = list(self.adapters.values())
        self.observers = [adapter for adapter in held if _overrides(adapter, "observe")]
        self.preparing = frozenset(name for name, adapter in self.adapters.items() if _overrides(adapter, "prepare"))
        self.call_enders = [adapter for adapter in held if _overrides(adapter, "call_ended")]
        needs_pre_hook = bool(self.observers or self.preparing or self.rejoins_input)
        needs_end_hook = needs_pre_hook or bool(self.call_enders)
        if needs_pre_hook and self.pre_hook_handle is None:
            self.pre_hook_handle = module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        elif not needs_pre_hook and self.pre_hook_handle is not None:
            self.pre_hook_handle.remove()
            self.pre_hook_handle = None
        if needs_end_hook and self.end_hook_handle is None:
            self.end_hook_handle = module.register_forward_hook(self.end_call, always_call=True)
        elif not needs_end_hook and self.end_hook_handle is not None:
            self.end_hook_handle.remove()
            self.end_hook_handle = None

    def remove_hooks(self) -> None:
        for handle in (self.hook_handle, self.pre_hook_handle, self.end_hook_handle):
            if handle is not None:
                handle.remove()
        self.hook_handle = self.pre_hook_handle = self.end_hook_handle = None

    def set_active(self, names: tuple[str, ...], skipped: bool = False) -> None:
        """Precompute the adapters the hook runs, in activation order (merged ones are in the weights);
        none where AdapterDrop skips the block (`skipped`), whatever adapters the rows name."""
        self.skipped = skipped
        names = () if skipped else names
        self.active = [self.adapters[name] for name in names if name in self.adapters and name not in self.merges]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        note = CallNote()
        self._notes.setdefault(get_ident(), []).append(note)
        state = self.state
        if state.disabled:
            return None
        for observer in self.observers:
            observer.observe(module, args, kwargs)
        if state.row_groups is not None:
            groups = [(self.adapters[name], name, rows) for name, rows in self._row_groups() if name in self.preparing]
            if groups:
                args, kwargs = groups[0][0].prepare_rows(module, args, kwargs, groups, state, note)
        else:
            for adapter in self.active:
                args, kwargs = adapter.prepare(module, args, kwargs, note)
        note.base_input = detached_input(args) if self.rejoins_input else None
        if note.base_input is not None:
            args = (note.base_input.detach(), *args[1:])
        return args, kwargs

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.state
        if state.disabled:
            return output
        notes = self._notes.get(get_ident()) if self.pre_hook_handle is not None else None
        if notes and notes[-1].base_input is not None:
            output = rejoin(output, notes[-1].base_input, module)
            args = (notes[-1].base_input, *args[1:])
        if state.row_groups is not None:
            output = self._mixed_batch(module, args, kwargs, output)
        else:
            for adapter in self.active:
                output = adapter(module, args, kwargs, output)
        return notes[-1].finish(output) if notes else output

    def end_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After every call, even one that raised: its note goes, and so does what adapters kept of it."""
        thread = get_ident()
        notes = self._notes.get(thread) if self.pre_hook_handle is not None else None
        if notes:
            notes.pop()
            if not notes:
                del self._notes[thread]
        for adapter in self.call_enders:
            adapter.call_ended()

    def _mixed_batch(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Each group of rows gets its own adapter; rows of other adapters or `None` keep the base output."""
        if self.merges:
            raise DeltaTuneError("mixed batches need unmerged adapters: call unmerge() first")
        for name, group in self._row_groups():
            if name in self.adapters:
                adapter = self.adapters[name]
                leading = adapter.batch_size(module, output)
                rows = self.state.expanded_rows(name, group, leading, leading_tensor(output).device)
                output = adapter.forward_rows(module, args, kwargs, output, rows)
        return output

    def _row_groups(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """The mixed batch's (adapter, its rows) groups that run here: none in a block AdapterDrop skips."""
        return () if self.skipped else self.state.row_groups or ()


def site_of(module: nn.Module) -> DeltaSite | None:
    """The site on `module`, if deltatune adapted it."""
    site = module._modules.get(SITE_ATTRIBUTE)
    return site if isinstance(site, DeltaSite) else None


def open_site(module: nn.Module, state: RoutingState) -> DeltaSite:
    """The site on `module`, created (with its hook) on first use."""
    site = site_of(module)
    if site is None:
        if SITE_ATTRIBUTE in module._modules or hasattr(module, SITE_ATTRIBUTE):
            raise DeltaTuneError(f"{type(module).__name__} already has an attribute {SITE_ATTRIBUTE!r}")
        site = DeltaSite(state).train(module.training)
        site.rejoins_input = backward_by_dequantizing(module)
        module.add_module(SITE_ATTRIBUTE, site)
        site.hook_handle = module.register_forward_hook(site.hook, with_kwargs=True)
    return site


def remove_adapter(module: nn.Module, name: str) -> None:
    """Take adapter `name` off `module`'s site; the site and its hooks go once no adapter is left."""
    site = site_of(module)
    if site is None or name not in site.adapters:
        return
    try:
        site.remove(module, name)
    finally:
        if len(site.adapters) == 0:
            site.remove_hooks()
            del module._modules[SITE_ATTRIBUTE]
