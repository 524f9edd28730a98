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

On a float16 / bfloat16 model, adapters keep float32 parameters (`keep_in_float32`, peft's
`autocast_adapter_dtype`): an adapter's forward casts what it reads to its own dtype and what it
returns to the module output's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import DeltaTuneError
from .quantized_grad import backward_by_dequantizing, detached_input, rejoin

SITE_ATTRIBUTE = "deltatune"

FLOAT32_UPCAST = frozenset(
    {torch.float16, torch.bfloat16}
    | {
        getattr(torch, name)
        for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
        if hasattr(torch, name)
    }
)
"""Parameter dtypes that adapters keep in float32 instead (the set peft's `autocast_adapter_dtype` upcasts)."""


class RowValues(NamedTuple):
    """A merge delta that sets rows `indices` (dim 0) of a parameter to `values` instead of adding to
    them (trained embedding rows). Merge keeps the rows it overwrote, so unmerge puts them back bit-exactly
    and keeps k × d numbers, not a vocabulary-sized delta."""

    indices: torch.Tensor
    values: torch.Tensor


class SiteAdapter(nn.Module):
    """Base of the modules a site holds: one adapter of one method at one module.

    `forward(module, args, kwargs, output)` returns the module's new output. A mergeable adapter
    overrides `delta_parameters` (per parameter, a tensor to add or `RowValues` to set). How its tensors
    are named in peft's files is its method's codec's business (`peft_format.PeftCodec`), not the adapter's.
    """

    delta_reads_module: bool = True
    """Whether `delta_parameters` depends on the module's weights. Then merge keeps the deltas it
    added so that unmerge can subtract exactly those; LoRA and BitFit set False and keep nothing."""
    merges_tied_weights: bool = False
    """Whether the deltas are meant for every module that shares the parameter (trainable tokens of an
    embedding whose tied head holds the same rows): then merge writes a tied weight instead of refusing."""
    keeps_module_dtype: bool = False
    """Whether the parameters stay in the module's dtype where adapters are kept in float32
    (`keep_in_float32`): a `modules_to_save` copy runs in the module's place, as in peft."""

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        raise NotImplementedError

    def observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """See the module's inputs before every call, whichever adapters are active (a tap that another
        adapter reads). Default: nothing, and no pre-hook for it."""

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        """Rewrite the module's inputs before it runs (soft prompts); what the output then needs goes
        into `note`, this call's own (`note.then`). Default: no pre-hook at all."""
        return args, kwargs

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        """Mixed batch: rewrite the inputs of the whole batch at once. `groups` holds (adapter, name, rows)
        for every adapter of this site that has rows (`state.expanded_rows` expands them); the site calls the
        first group's adapter. Default: refused."""
        raise DeltaTuneError(
            f"{type(self).__name__} rewrites inputs and does not support mixed batches; run each adapter in its own "
            "batch"
        )

    def call_ended(self) -> None:
        """After every call of the module, and of the `DeltaModel`, even one that raised: drop what the
        call left with this adapter (a tapped input). Default: nothing, and no hook for it."""

    def close(self) -> None:
        """The adapter leaves its site (delete, unload, a failed add): release what it holds outside
        its parameters. Default: nothing."""

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        """Mixed batch: apply this adapter to the rows `rows` of the batch only. The default slices the
        first positional input and the output along dim 0; adapters that see other layouts override."""
        sub_args = (args[0].index_select(0, rows), *args[1:])
        return put_rows(output, self(module, sub_args, kwargs, output.index_select(0, rows)), rows)

    def batch_size(self, module: nn.Module, output: Any) -> int:
        """The size of the batch dimension that `forward_rows` indexes: the output's first dim (of its
        first tensor, for a tuple or a ModelOutput)."""
        return _leading_size(output)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """{name of a parameter of `module`: float32 delta to add to it} for merging."""
        raise DeltaTuneError(f"{type(self).__name__} cannot be merged into the weights; use unload(merge=False)")

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tensors saved for this adapter, by name."""
        return self.state_dict()

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors, strict=True)


class ObservingAdapter(SiteAdapter):
    """A site adapter that only watches its module's calls (`observe`: a tap that another adapter reads):
    the output passes unchanged, nothing merges, nothing is saved."""

    delta_reads_module = False

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Nothing to fold in: whether the method merges is for the adapters that read the tap to say."""
        return {}

    def file_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing saved, nothing to load."""


def put_rows(full: torch.Tensor, part: torch.Tensor, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`full` with its `rows` along `dim` replaced by `part` (in place when no gradient is recorded)."""
    part = part.to(full.dtype)
    if torch.is_grad_enabled():
        return full.index_copy(dim, rows, part)
    return full.index_copy_(dim, rows, part)


def keep_in_float32(adapter: SiteAdapter) -> None:
    """Cast the adapter's half-precision parameters and buffers (`FLOAT32_UPCAST`) to float32, unless it
    `keeps_module_dtype`: small optimizer updates would round away in them. The parameter objects stay
    (`Module._apply` replaces their data), so parameters tied across sites stay tied."""
    if not adapter.keeps_module_dtype:
        adapter._apply(lambda tensor: tensor.float() if tensor.dtype in FLOAT32_UPCAST else tensor)


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

    def set_active(self, names: tuple[str, ...]) -> None:
        """Precompute the adapters the hook runs, in activation order (merged ones are in the weights)."""
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
            groups = [(self.adapters[name], name, rows) for name, rows in state.row_groups if name in self.preparing]
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
        for name, group in self.state.row_groups:
            if name in self.adapters:
                adapter = self.adapters[name]
                rows = self.state.expanded_rows(name, group, adapter.batch_size(module, output), _device(output))
                output = adapter.forward_rows(module, args, kwargs, output, rows)
        return output


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


def _leading_size(output: Any) -> int:
    """Batch size of a module output: a tensor, or the first tensor of a tuple or ModelOutput (transformers)."""
    return (output if isinstance(output, torch.Tensor) else output[0]).shape[0]


def _device(output: Any) -> torch.device:
    return (output if isinstance(output, torch.Tensor) else output[0]).device
