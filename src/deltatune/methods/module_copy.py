"""`modules_to_save`: a full, trainable copy of a module (a classifier head, say), one per adapter.

While the adapter is active the copy's output replaces the original's. Merging writes the copy's
parameters over the original's (as the delta `copy - original`, so merge stays generic). The copy keeps
the module's dtype, as in peft: it runs in the module's place, on the module's inputs. It is a copy of
the module as the base model has it (`base_copy`): the adapters of other adapters inside the module, and
their hooks, stay with the original, so the copy is trained for its own adapter only.

In a mixed batch the copy runs on its rows only. A module returning one tensor has the batch at dim 0
of its first input and of its output. A recurrent layer (`nn.RNN`, `nn.GRU`, `nn.LSTM`) returns
(sequences, h_n), or (sequences, (h_n, c_n)): the sequences (input and output) have the batch at dim 0
with `batch_first`, else at dim 1; the hidden states (given and returned) always at dim 1. Other tuple
outputs have no known batch dimension and are refused.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..quantized import quantized_linear
from ..site import SITE_ATTRIBUTE, site_of
from ..site_adapter import SiteAdapter, put_rows

HiddenState = torch.Tensor | tuple[torch.Tensor, ...] | None
"""A recurrent layer's h (RNN, GRU) or (h, c) (LSTM)."""


class ModuleCopy(SiteAdapter):
    """A trainable copy of `module`, run in its place. File names are the module's own (`weight`)."""

    keeps_module_dtype = True

    def __init__(self, module: nn.Module, name: str = "the module") -> None:
        super().__init__()
        refuse_untrainable(module, name)
        self.copy = base_copy(module)
        for parameter in self.copy.parameters():
            parameter.requires_grad_(True)
        self.recurrent = isinstance(module, nn.RNNBase)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.copy(*args, **kwargs)

    def batch_size(self, module: nn.Module, output: Any) -> int:
        if self.recurrent:
            sequences = output[0]
            if not isinstance(sequences, torch.Tensor) or sequences.dim() != 3:
                raise DeltaTuneError(
                    f"a mixed batch through the copy of {type(module).__name__} needs a padded batch of sequences "
                    "(a 3-D tensor, not a PackedSequence or one unbatched sequence); run each adapter in its own batch"
                )
            return sequences.shape[0 if module.batch_first else 1]
        if not isinstance(output, torch.Tensor):
            raise DeltaTuneError(
                f"modules_to_save module {type(module).__name__} returns a {type(output).__name__}, whose batch "
                "dimension a mixed batch cannot know (it supports modules that return one tensor, and nn.RNN, "
                "nn.GRU and nn.LSTM); run each adapter in its own batch"
            )
        return output.shape[0]

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        if not self.recurrent:
            return super().forward_rows(module, args, kwargs, output, rows)
        batch_dim = 0 if module.batch_first else 1
        given = args[1] if len(args) > 1 else kwargs.get("hx")
        sequences, final = self.copy(args[0].index_select(batch_dim, rows), _state_rows(given, rows))
        full_sequences, full_final = output
        return put_rows(full_sequences, sequences, rows, dim=batch_dim), _put_state_rows(full_final, final, rows)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach().float() - module.get_parameter(name).detach().float()
            for name, parameter in self.copy.named_parameters()
        }

    def file_state(self) -> dict[str, torch.Tensor]:
        return self.copy.state_dict()

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.copy.load_state_dict(tensors, strict=True)


class _LeftOut:
    """What a site of `module` becomes in its copy, for `base_copy` to take out."""


HOOK_FLAGS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
}
"""The hook dicts a site registers in, with the dicts that mark a hook's options by its id."""


def refuse_untrainable(module: nn.Module, name: str) -> None:
    """A copy trains the module's floating-point parameters: one holding quantized layers (packed weights,
    which cannot take gradients) or no floating-point parameter at all (GGUF blocks are buffers) is refused."""
    quantized = next(((inner, row) for inner in module.modules() if (row := quantized_linear(inner))), None)
    if quantized is not None:
        layer, row = quantized
        what = f"{name} is a quantized layer ({row.describe(layer)})"
    elif not any(parameter.is_floating_point() for parameter in module.parameters()):
        what = f"{name} holds no floating-point parameters (its weights are stored quantized)"
    else:
        return
    raise DeltaTuneError(
        f"modules_to_save: {what}, so a trainable copy of it cannot be made; target it with an adapter "
        "(LoRA, BitFit) instead, or load the base in full precision"
    )


def base_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` as the base model has it: every site in it (the module's own and those of
    its submodules, with their adapters of other adapters) and every hook of those sites is left out.
    The sites are not copied at all (the deep copy's memo maps each to a placeholder), and the original
    is not changed."""
    left_out = _LeftOut()
    memo: dict[int, Any] = {id(site): left_out for sub in module.modules() if (site := site_of(sub)) is not None}
    copied = copy.deepcopy(module, memo)
    pending = [copied]
    while pending:
        current = pending.pop()
        if current._modules.get(SITE_ATTRIBUTE) is left_out:
            del current._modules[SITE_ATTRIBUTE]
        for hooks_name, flag_names in HOOK_FLAGS.items():
            hooks = getattr(current, hooks_name)
            for hook_id in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is left_out]:
                del hooks[hook_id]
                for flag_name in flag_names:
                    getattr(current, flag_name).pop(hook_id, None)
        pending.extend(child for child in current._modules.values() if child is not None)
    return copied


def _state_rows(state: HiddenState, rows: torch.Tensor) -> HiddenState:
    """The `rows` of a given hidden state (batch at dim 1), h or each of (h, c)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(part.index_select(1, rows) for part in state)
    return state.index_select(1, rows)


def _put_state_rows(full: HiddenState, part: HiddenState, rows: torch.Tensor) -> HiddenState:
    """`full` with its `rows` (batch at dim 1) from `part`, for h or each of (h, c)."""
    if isinstance(full, tuple):
        return tuple(put_rows(whole, piece, rows, dim=1) for whole, piece in zip(full, part))
    return put_rows(full, part, rows, dim=1)
