"""LoRA initialisations from data: EVA (`lora_eva`) and CorDA (`lora_corda`), run by one call.

    deltatune.initialize_from_data(delta_model, batches, name="default")

`batches`: an iterable of dicts of model inputs (`input_ids`, `attention_mask`, `labels`, ...), each
run as `forward(model, batch)` (default `model(**batch)`) with every adapter disabled, so the layers
see the base model's inputs. Each method's statistics of a layer's inputs (`LayerStatistics`) see the
input tensor of every call and the token positions the batch keeps (None when it has no
`input_ids`, or when the layer's sequence is another one, a decoder's). `deltatune train` calls this
on the first batches of its training data when the adapter's init asks for it (`train/data_init.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import DeltaTuneError

if TYPE_CHECKING:
    from ..model import DeltaModel

Forward = Callable[[nn.Module, Mapping[str, Any]], Any]


class LayerStatistics(Protocol):
    def add(self, inputs: torch.Tensor, kept: torch.Tensor | None) -> None:
        """One call's layer input (…, in), with the (batch, sequence) booleans of its kept positions."""


def settings_from_dict(settings_class: type, data: dict[str, Any], field: str, note: str) -> Any:
    """`settings_class(**data)`, refusing keys it lacks, and bad values, in one line that names them."""
    known = [item.name for item in dataclasses.fields(settings_class)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DeltaTuneError(f"{field} has no {', '.join(unknown)}; it takes {', '.join(known)} ({note})")
    try:
        return settings_class(**data)
    except DeltaTuneError as error:  # name the setting as the config holds it: eva_config.batches
        message = str(error)
        raise DeltaTuneError(message if message.startswith(field) else f"{field}.{message}") from None


def token_mask(batch: Mapping[str, Any], label_mask_value: int | None = None) -> torch.Tensor | None:
    """(batch, sequence) booleans: the attention mask, and, if `label_mask_value` is given, the positions
    whose label differs from it; None for a batch without `input_ids`."""
    if "input_ids" not in batch:
        return None
    tokens = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(tokens)).bool()
    labels = batch.get("labels")
    if label_mask_value is not None and labels is not None and labels.shape == tokens.shape:
        mask = mask & (labels != label_mask_value)
    return mask


def gather_layer_inputs(
    delta_model: DeltaModel,
    statistics: dict[str, LayerStatistics],
    batches: Iterable[Mapping[str, Any]],
    mask: Callable[[Mapping[str, Any]], torch.Tensor | None],
    forward: Forward | None = None,
) -> None:
    """Run `batches` through the base model (adapters disabled, eval mode, no gradients), feeding each
    layer's inputs to `statistics[layer]`."""
    run = forward or (lambda model, batch: model(**batch))
    current: list[torch.Tensor | None] = [None]

    def hook_for(layer: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs, kept = args[0], current[0]
            statistics[layer].add(inputs, kept if kept is not None and inputs.shape[:-1] == kept.shape else None)

        return hook

    modules = [delta_model.base_model.get_submodule(layer) for layer in statistics]
    handles = [module.register_forward_hook(hook_for(layer)) for module, layer in zip(modules, statistics)]
    training = delta_model.training
    delta_model.eval()
    seen = 0
    try:
        with torch.no_grad(), delta_model.disabled():
            for batch in batches:
                current[0] = mask(batch)
                run(delta_model, batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        delta_model.train(training)
    if not seen:
        raise DeltaTuneError("initialize_from_data got no batches; pass an iterable of model-input dicts")


def initialize_from_data(
    delta_model: DeltaModel, batches: Iterable[Mapping[str, Any]], name: str = "default", forward: Forward | None = None
) -> None:
    """Start LoRA adapter `name` from `batches` as its `init_lora_weights` says ("eva" or "corda")."""
    from .lora_corda import initialize_corda
    from .lora_eva import initialize_eva

    starts = {"eva": initialize_eva, "corda": initialize_corda}
    delta_model.require([name])
    init = getattr(delta_model.configs[name], "init_lora_weights", None)
    if init not in starts:
        raise DeltaTuneError(
            f"initialize_from_data starts LoRA adapters made with init_lora_weights 'eva' or 'corda'; {name!r} "
            f"has {init!r}"
        )
    starts[init](delta_model, batches, name, forward)


def needs_data(config: Any) -> bool:
    """Whether adapter config `config` asks to start from data."""
    return getattr(config, "init_lora_weights", None) in ("eva", "corda")


def data_batch_count(config: Any) -> int:
    """How many batches of the training data `deltatune train` gives `initialize_from_data`."""
    settings = config.eva_config if config.init_lora_weights == "eva" else config.corda_config
    return settings.batches if settings is not None else DEFAULT_BATCHES


DEFAULT_BATCHES = 8
