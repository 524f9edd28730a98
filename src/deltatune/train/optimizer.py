"""The trainer's AdamW and its parameter groups, plain or LoRA+, and LoRA's A factors frozen.

Plain: one group, every trainable parameter at `learning_rate` with `weight_decay`.

A task whose new head trains fully beside the adapter (seq-cls, token-cls, qa: `TaskType.trains_head`)
adds one last group, "head": the head's trainable parameters (its modules_to_save copy; under `full`
the head's own parameters) at `head_learning_rate` with `weight_decay`, taken out of the groups above.
A freshly initialised head at a small adapter or full fine-tuning rate leaves the loss near ln(classes)
for much of a short run.

LoRA+ (Hayou et al. 2024, `loraplus_lr_ratio` = λ): B factors learn faster than A factors,
η_B = λ·η_A, because at large width the two factors of BA need learning rates of different orders
for feature learning to be efficient. The groups are peft's (`create_loraplus_optimizer`, with
`loraplus_weight_decay` = `weight_decay`), always four and in this order, so a checkpoint's groups
line up with the live ones:

    group         parameters                                           rate     weight decay
    A             every one not below (A factors, 2-D saved weights)   η        weight_decay
    embedding     both factors of a LoRA on an embedding               η_emb    weight_decay
    B             `lora_B` and every other 1-D parameter               λ·η      weight_decay
    B, no decay   those of B named `bias` or inside an nn.LayerNorm    λ·η      0

η_emb is `loraplus_lr_embedding`, an absolute rate as in peft (the scheduler scales it like the rest:
`LambdaLR` multiplies every group's initial rate by the same factor).

`freeze_lora_a`: the A factors keep their initialisation and only B (and any saved module) trains:
the frozen A of LoRA-FA (Zhang et al. 2023), the same parameters peft's `create_lorafa_optimizer`
freezes (every `lora_A`; an embedding's A, peft's `lora_embedding_A`, still trains). It is not LoRA-FA
whole: peft's LoRA-FA optimizer also replaces B's gradient g by its projection (1/s²) g (A Aᵀ)⁻¹ and
steps with its own AdamW; here B steps with torch's AdamW on its plain gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import unwrap
from ..methods.lora import LoraEmbedding
from .checkpoint import trainable_parameters
from .config import TrainConfig
from .tasks import get_task, trained_heads

LORAPLUS_GROUPS = ("A", "embedding", "B", "B, no decay")
"""The LoRA+ parameter groups, in the optimizer's order."""


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, grouped as the config asks (see the module)."""
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate, weight_decay=config.weight_decay)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: {"params", "lr", "weight_decay"} each; the head's group last
    for a task that trains a head (see the module)."""
    named = trainable_parameters(model)
    if not get_task(config.task).trains_head:
        return adapter_groups(model, named, config)
    heads = head_parameter_ids(model)
    rest = [(name, parameter) for name, parameter in named if id(parameter) not in heads]
    head = [(name, parameter) for name, parameter in named if id(parameter) in heads]
    return [*adapter_groups(model, rest, config), _group(head, config.head_learning_rate, config.weight_decay)]


def head_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of the parameters of the task head modules (`tasks.trained_heads`) of `model`."""
    base = unwrap(model)
    return {id(parameter) for head in trained_heads(base) for parameter in base.get_submodule(head).parameters()}


def adapter_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], config: TrainConfig) -> list[dict]:
    """The groups of the parameters `named` (all but the head's), plain or LoRA+."""
    if config.loraplus_lr_ratio is None:
        return [_group(named, config.learning_rate, config.weight_decay)]
    owners = _owners(model)
    members: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in LORAPLUS_GROUPS}
    for name, parameter in named:
        members[loraplus_group(name, parameter, owners[name])].append((name, parameter))
    rate, decay = config.learning_rate, config.weight_decay
    faster = rate * config.loraplus_lr_ratio
    settings = {
        "A": (rate, decay),
        "embedding": (config.loraplus_lr_embedding, decay),
        "B": (faster, decay),
        "B, no decay": (faster, 0.0),
    }
    return [_group(members[group], *settings[group]) for group in LORAPLUS_GROUPS]


def loraplus_group(name: str, parameter: nn.Parameter, owner: nn.Module) -> str:
    """Which LoRA+ group the parameter `name` (held by module `owner`) belongs to."""
    if isinstance(owner, LoraEmbedding):
        return "embedding"
    if name.rsplit(".", 1)[-1] == "lora_B" or parameter.ndim == 1:
        return "B, no decay" if "bias" in name or isinstance(owner, nn.LayerNorm) else "B"
    return "A"


def freeze_lora_a(model: nn.Module, config: TrainConfig) -> None:
    """With `freeze_lora_a`: stop training every LoRA A factor but an embedding's (see the module). Call
    before the optimizer is built and the model wrapped for data parallelism."""
    if not config.freeze_lora_a:
        return
    owners = _owners(model)
    for name, parameter in trainable_parameters(model):
        if name.rsplit(".", 1)[-1] == "lora_A" and not isinstance(owners[name], LoraEmbedding):
            parameter.requires_grad_(False)


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """{full parameter name: the module that holds it directly}."""
    return {
        f"{module_name}.{name}" if module_name else name: module
        for module_name, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
    }


def _group(named: list[tuple[str, nn.Parameter]], rate: float, decay: float) -> dict:
    return {"params": [parameter for _, parameter in named], "lr": rate, "weight_decay": decay}
