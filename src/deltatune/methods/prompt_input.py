"""Prompt tuning and P-tuning at the input stack: the prompt P goes in front of the token embeddings,
[P ; E(x)], with the mask, positions, cache and outputs handled as `soft_prompt` describes; an
encoder-decoder's decoder gets the extended cross-attention mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..placement import Placement
from ..site import CallNote, RoutingState
from ..site_adapter import SiteAdapter
from .soft_prompt import (
    CACHE_ARGUMENTS,
    CallShape,
    RowLayout,
    SoftPromptConfig,
    SoftPromptMethod,
    Stacks,
    parameter_names,
    trim_output,
)


class PromptInput(SiteAdapter):
    """Prompt tuning and P-tuning at the input stack: [P ; E(x)], mask, positions, output trimming.
    `source()` gives P (n × d): a `PromptTable`, or P-tuning's encoder."""

    def __init__(self, source: nn.Module, stack: nn.Module, stacks: Stacks, num_virtual_tokens: int) -> None:
        super().__init__()
        self.source = source
        self.num_virtual_tokens = num_virtual_tokens
        self.stacks = stacks
        self.names = parameter_names(stack)
        self.cache_key = next((name for name in CACHE_ARGUMENTS if name in self.names), "cache")
        self.accepts_positions = "position_ids" in self.names

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        call = CallShape(self.names, args, kwargs, self.cache_key)
        n = self.num_virtual_tokens
        first = call.cached == 0
        if first:
            call.check_length(n, self.stacks.max_positions)
            embeds = self._embeds(module, call)
            prompt = self.source().to(embeds.dtype).expand(call.batch, -1, -1)
            call.keywords["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            self._extend_token_types(call, n, None)
            if self.stacks.trim:
                note.then(lambda output: trim_output(output, n))
        call.extend_mask("attention_mask", None, n, call.length)
        call.shift_positions(n, None, first, self.accepts_positions)
        return (), call.keywords

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        call = CallShape(self.names, args, kwargs, self.cache_key)
        layout = RowLayout.of(groups, state, call.batch, call.device, rolled=call.cache is None)
        first = call.cached == 0
        if first:
            call.check_length(layout.width, self.stacks.max_positions)
            embeds = self._embeds(module, call)
            block = embeds.new_zeros(call.batch, layout.width, embeds.shape[-1])
            for adapter, rows in layout.groups:
                prompt = adapter.source().to(embeds.dtype)
                start = layout.offset(prompt.shape[0])
                block[rows, start : start + prompt.shape[0]] = prompt
            call.keywords["inputs_embeds"] = layout.combine(block, embeds)
            self._extend_token_types(call, layout.width, layout)
            if self.stacks.trim:
                note.then(lambda output: trim_output(output, layout.width, layout))
        real_past = call.cached - (0 if first else layout.width)
        call.extend_mask("attention_mask", layout, layout.width, real_past + call.length)
        call.shift_positions(layout.width, layout, first, self.accepts_positions, real_past)
        return (), call.keywords

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The output is trimmed by the step `prepare` left in the call's note."""
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        """The whole batch was rewritten at once (by the first group's adapter, whose note trims it)."""
        return output

    @staticmethod
    def _embeds(module: nn.Module, call: CallShape) -> torch.Tensor:
        embeds = call.keywords.pop("inputs_embeds", None)
        token_ids = call.keywords.pop("input_ids", None)
        return embeds if embeds is not None else module.get_input_embeddings()(token_ids)

    @staticmethod
    def _extend_token_types(call: CallShape, width: int, layout: RowLayout | None) -> None:
        """Virtual tokens are of type 0."""
        token_types = call.keywords.get("token_type_ids")
        if token_types is not None:
            block = token_types.new_zeros(token_types.shape[0], width)
            call.keywords["token_type_ids"] = (
                layout.combine(block, token_types) if layout is not None else torch.cat([block, token_types], dim=1)
            )


class EncoderPromptMask(SiteAdapter):
    """On an encoder-decoder's decoder: the cross-attention mask covers the encoder's virtual positions."""

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None:
            kwargs = {
                **kwargs,
                "encoder_attention_mask": torch.cat(
                    [mask.new_ones(mask.shape[0], self.num_virtual_tokens), mask], dim=1
                ),
            }
        return args, kwargs

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        states = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_attention_mask")
        layout = RowLayout.of(
            groups, state, states.shape[0], states.device, rolled=True
        )  # the encoder runs without a cache
        if mask is None:
            mask = torch.ones(states.shape[0], states.shape[1] - layout.width, dtype=torch.long, device=states.device)
        return args, {**kwargs, "encoder_attention_mask": layout.combine(layout.mask_block().to(mask.dtype), mask)}

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output


class PromptInputMethod(SoftPromptMethod):
    """Prompt tuning and P-tuning: a prompt at the input stack (and the cross-attention mask of a decoder)."""

    def build_source(self, placement: Placement, config: SoftPromptConfig) -> nn.Module:
        raise NotImplementedError

    def adapters(self, placement: Placement, config: SoftPromptConfig, stacks: Stacks) -> dict[str, SiteAdapter]:
        stack = placement.model.get_submodule(stacks.input)
        built: dict[str, SiteAdapter] = {
            stacks.input: PromptInput(self.build_source(placement, config), stack, stacks, config.num_virtual_tokens)
        }
        if stacks.decoder is not None:
            built[stacks.decoder] = EncoderPromptMask(config.num_virtual_tokens)
        return built
