"""Trainable tokens: train only chosen rows of the embedding (peft's `TrainableTokensConfig`, peft type
TRAINABLE_TOKENS), for new special tokens or a chat template's tokens, and save only those rows: k × d
numbers instead of a whole vocabulary × d embedding (SmolLM2: an adapter for 2 new tokens is a 9.9 KB
folder, the rows twice over with the tied head's copy, where its embedding is 113 MB).

The rows and their math are in `token_rows`. This file holds the method, its config and its peft codec,
and `token_rows_at`, which LoRA's `trainable_token_indices` uses too: the adapters for {module: indices},
plus, where the model ties an output head to its input embedding (SmolLM2, GPT-2), an adapter at the
head that holds the embedding's rows, so the head's logits of those tokens use the trained rows (peft
wraps the tied head the same way).

New tokens: add them to the tokenizer, resize the model's embeddings, then train their ids:

    tokenizer.add_tokens(["<tool>", "</tool>"], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(["<tool>", "</tool>"])
    deltatune.attach(model, deltatune.TrainableTokensConfig(token_indices=ids))

The rows of the resized embedding are random: the adapter replaces them, so a reload that resizes
again (new random rows) gives the same outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import TargetedConfig
from ..errors import DeltaTuneError, TargetConflictError, TargetNotFoundError
from ..field_check import NonNegativeInt
from ..peft_format import PeftCodec
from ..peft_keys import TRAINABLE_TOKENS_READ, check_method_keys
from ..placement import Placement
from ..registry import register
from ..targeting import model_modules, resolve_names
from .base import ModuleMethod
from .token_rows import TOKEN_ROW_TYPES, TokenRows, token_rows_for


def check_token_indices(indices: list[int], field: str) -> None:
    """A non-empty list of distinct indices (peft writes rows by index: a repeated one is ambiguous)."""
    if not indices:
        raise DeltaTuneError(f"{field} is empty; list the ids of the tokens to train")
    repeated = sorted({index for index in indices if indices.count(index) > 1})
    if repeated:
        raise DeltaTuneError(f"{field} lists token {repeated[0]} more than once; list each token once")


@dataclasses.dataclass
class TrainableTokensConfig(TargetedConfig):
    """Trainable-tokens settings; names and defaults follow peft's `TrainableTokensConfig`."""

    token_indices: list[NonNegativeInt] = dataclasses.field(default_factory=list)
    """Ids of the tokens whose rows train (new tokens: their ids after `resize_token_embeddings`)."""
    init_weights: bool = True
    """True: the rows start as the embedding's (the model starts unchanged); False: random rows (tests)."""

    def validate(self) -> None:
        super().validate()
        check_token_indices(self.token_indices, "token_indices")


def input_embedding_name(model: nn.Module) -> str | None:
    """The full name of the model's input embedding (`get_input_embeddings`), None where it has none."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except NotImplementedError:
        embedding = None
    return next((name for name, module in model_modules(model) if name and module is embedding), None)


def token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """LoRA's `trainable_token_indices` as {full module name: indices}: a list is for the input embedding
    (`embed_tokens` where the model does not say which it is, as peft); a dict's keys match as suffixes."""
    if not isinstance(spec, dict):
        name = input_embedding_name(model)
        if name is not None:
            return {name: list(spec)}
        spec = {"embed_tokens": spec}
    targets: dict[str, list[int]] = {}
    for entry, indices in spec.items():
        for name in resolve_names(model, [entry], "trainable_token_indices"):
            targets[name] = list(indices)
    return targets


def token_rows_at(
    model: nn.Module, indices_by_module: dict[str, list[int]], init_weights: bool = True, saves_shared: bool = False
) -> dict[str, TokenRows]:
    """{module name: its token-rows adapter} for `indices_by_module`, plus an adapter sharing the input
    embedding's rows at every module tied to it (same weight) that is not given indices of its own;
    `saves_shared`: whether those store the rows too (peft's TRAINABLE_TOKENS files do)."""
    built = {}
    for module_name, indices in indices_by_module.items():
        module = model.get_submodule(module_name)
        built[module_name] = token_rows_for(module, module_name)(module, indices, init_weights)
    leader_name = input_embedding_name(model)
    if leader_name not in built:
        return built
    leader, indices, weight = (
        built[leader_name],
        indices_by_module[leader_name],
        model.get_submodule(leader_name).weight,
    )
    tied = [
        name
        for name, module in model_modules(model)
        if name != leader_name and getattr(module, "weight", None) is weight
    ]
    following = [name for name in tied if indices_by_module.get(name, indices) == indices]
    for name in following:
        module = model.get_submodule(name)
        built[name] = token_rows_for(module, name)(module, indices, shared=leader.rows, saves_shared=saves_shared)
    leader.merges_tied_weights = len(following) == len(tied)
    return built


def token_rows_beside(
    model: nn.Module, spec: list[int] | dict[str, list[int]] | None, taken: set[str], saved: list[str]
) -> dict[str, TokenRows]:
    """LoRA's `trainable_token_indices`: the token-rows adapters (a tied head's stores nothing, as in peft),
    refused at modules LoRA adapts (`taken`) or that train whole (inside `saved`, `modules_to_save`)."""
    if not spec:
        return {}
    built = token_rows_at(model, token_targets(model, spec))
    for name in built:
        if name in taken or any(name == entry or name.startswith(entry + ".") for entry in saved):
            raise TargetConflictError(
                f"{name!r} has trainable tokens (trainable_token_indices, or tied to the embedding that has them) "
                "and is also a LoRA target or in modules_to_save; train it one way only"
            )
    return built


class TrainableTokensPeft(PeftCodec):
    """Trainable tokens in peft's files: `token_indices`, `target_modules`, `init_weights`, and each
    adapted module's rows under `<module path>.trainable_tokens_delta` (the new rows, not a difference,
    whatever the name says), a tied head's too."""

    peft_type = "TRAINABLE_TOKENS"
    tensor_names = {TokenRows: {"rows": "trainable_tokens_delta"}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, TRAINABLE_TOKENS_READ)

    def task_type(self, config: TrainableTokensConfig, model: nn.Module) -> str | None:
        return None

    def config_to_peft(self, config: TrainableTokensConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        if config.modules_to_save:
            raise DeltaTuneError(
                "peft's TRAINABLE_TOKENS adapters have no modules_to_save, so peft would drop those modules; "
                "save with format='deltatune', or use LoRA with trainable_token_indices"
            )
        return {"token_indices": config.token_indices, "target_modules": targets, "init_weights": config.init_weights}

    def config_from_peft(self, data: dict[str, Any]) -> TrainableTokensConfig:
        fields = {key: data[key] for key in TRAINABLE_TOKENS_READ if data.get(key) is not None}
        return TrainableTokensConfig(**fields)


@register("trainable_tokens")
class TrainableTokens(ModuleMethod):
    """Train the rows of `token_indices` in the selected embeddings (the input embedding by default)."""

    config_class = TrainableTokensConfig
    adapter_types = TOKEN_ROW_TYPES
    peft_codec = TrainableTokensPeft()

    def default_targets(self, model: nn.Module) -> list[str]:
        name = input_embedding_name(model)
        if name is None:
            raise TargetNotFoundError(
                "this model has no input embedding (get_input_embeddings); name the embedding layer in target_modules"
            )
        return [name]

    def attach(self, placement: Placement, config: TrainableTokensConfig) -> None:
        targets = self.select(placement.model, config)
        built = token_rows_at(
            placement.model, dict.fromkeys(targets, config.token_indices), config.init_weights, saves_shared=True
        )
        for module_name, adapter in built.items():
            placement.put(module_name, adapter, target=module_name in targets)
