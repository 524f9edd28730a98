"""The adapter's half of the method contract: `SiteAdapter`, the module a `DeltaSite` holds for one adapter
of one method at one module, with what merging and saving ask of it; `ObservingAdapter` for taps that
only watch; `RowValues` for merges that set rows; and the dtype rule of adapters on half-precision models
(`keep_in_float32`, peft's `autocast_adapter_dtype`: an adapter's forward casts what it reads to its own
dtype and what it returns to the module output's dtype)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .errors import DeltaTuneError

if TYPE_CHECKING:
    from .site import CallNote, RoutingState

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
        return leading_tensor(output).shape[0]

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


def leading_tensor(output: Any) -> torch.Tensor:
    """A module output's tensor: the output itself, or the first tensor of a tuple or ModelOutput (transformers)."""
    return output if isinstance(output, torch.Tensor) else output[0]
