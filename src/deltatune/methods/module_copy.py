"""`modules_to_save`: a full, trainable copy of a module (a classifier head, say), one per adapter.

While the adapter is active the copy's output replaces the original's. Merging writes the copy's
parameters over the original's (as the delta `copy - original`, so merge stays generic). The copy keeps
the module's dtype, as in peft: it runs in the module's place, on the module's inputs.

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
from ..site import SITE_ATTRIBUTE, SiteAdapter, put_rows

HiddenState = torch.Tensor | tuple[torch.Tensor, ...] | None
"""A recurrent layer's h (RNN, GRU) or (h, c) (LSTM)."""


class ModuleCopy(SiteAdapter):
    """A trainable copy of `module`, run in its place. File names are the module's own (`weight`)."""

    keeps_module_dtype = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        original_site = module._modules.pop(SITE_ATTRIBUTE, None)
        try:
            self.copy = copy.deepcopy(module)
        finally:
            if original_site is not None:
                module._modules[SITE_ATTRIBUTE] = original_site
        self.copy._forward_hooks.clear()
        self.copy._forward_hooks_with_kwargs.clear()
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
