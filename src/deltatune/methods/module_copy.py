"""`modules_to_save`: a full, trainable copy of a module (a classifier head, say), one per adapter.

While the adapter is active the copy's output replaces the original's. Merging writes the copy's
parameters over the original's (as the delta `copy - original`, so merge stays generic).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..site import SITE_ATTRIBUTE, SiteAdapter


class ModuleCopy(SiteAdapter):
    """A trainable copy of `module`, run in its place. File names are the module's own (`weight`)."""

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
        self.peft_names = {name: name for name in self.copy.state_dict()}

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.copy(*args, **kwargs)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach().float() - module.get_parameter(name).detach().float()
            for name, parameter in self.copy.named_parameters()
        }

    def file_state(self) -> dict[str, torch.Tensor]:
        return self.copy.state_dict()

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.copy.load_state_dict(tensors, strict=True)
