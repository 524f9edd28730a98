"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv:2205.05638).

A learned vector l rescales one side of each adapted layer (keys, values and the feed-forward's inner
activation in the paper):

    y = l ⊙ (W x + b)      l: out_features     (attention projections: the output is rescaled)
    y = W (l ⊙ x) + b      l: in_features      (a layer in `feedforward_modules`: the input is)

l starts at ones, so the adapted model equals the base. Stored as peft stores it, `ia3_l`: (out, 1) or
(1, in) on Linear and GPT-2 Conv1D layers, (1, channels, 1, ...) on Conv2d / Conv3d. Merging folds l into
the weights, ΔW = W ⊙ (l − 1) along the scaled axis (Δb = b ⊙ (l − 1) for an output scale); the delta
reads W, so merge keeps what it added and unmerge subtracts exactly that (peft divides by l instead).

The input scale runs in the layer's forward pre-hook (`prepare`): the layer itself computes W (l ⊙ x) in
its one matmul, at the cost of one elementwise product over x, as in peft. The other ways to scale the
input each cost more: W ⊙ l materialised per call (a copy of W, and ∂l through a full matmul), or
W x + W((l − 1) ⊙ x), a second full matmul. A mixed batch builds one (rows × in) table of scales (ones
where a row has no (IA)³ adapter here) and multiplies x by it once, the same single product.
Layers: `nn.Linear`, transformers' `Conv1D`, `nn.Conv2d` / `nn.Conv3d` (peft's set), and the quantized
linears of `deltatune.quantized` (peft has bitsandbytes 4- and 8-bit): the scale meets the layer's input
or output, so the packed weight is never read but to merge into its dequantized copy.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import TargetedConfig, _as_name_list
from ..errors import DeltaTuneError, TargetNotFoundError
from ..field_check import Regex
from ..peft_format import PeftCodec
from ..peft_keys import IA3_READ, IA3_TOLERATED, check_method_keys
from ..placement import Placement
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..registry import register
from ..site import CallNote, RoutingState
from ..site_adapter import SiteAdapter, put_rows
from .base import ModuleMethod, lookup_type

DEFAULT_TARGETS = {
    **dict.fromkeys(["llama", "mistral"], ["k_proj", "v_proj", "down_proj"]),
    **dict.fromkeys(["qwen2", "qwen3", "gemma", "gemma2"], ["q_proj", "v_proj", "down_proj"]),
    **dict.fromkeys(["bert", "roberta"], ["key", "value", "output.dense"]),
    **dict.fromkeys(["bart", "phi"], ["q_proj", "v_proj", "fc2"]),
    **dict.fromkeys(["gpt_neox", "falcon"], ["query_key_value", "dense_4h_to_h"]),
    "opt": ["q_proj", "k_proj", "fc2"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
}
"""peft 0.21's default (IA)³ targets per model type (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`)."""

DEFAULT_FEEDFORWARD = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], ["down_proj"]),
    **dict.fromkeys(["bert", "roberta"], ["output.dense"]),
    **dict.fromkeys(["opt", "bart", "phi"], ["fc2"]),
    **dict.fromkeys(["gpt_neox", "falcon"], ["dense_4h_to_h"]),
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
}
"""peft 0.21's default feed-forward layers per model type (`..._IA3_FEEDFORWARD_MODULES_MAPPING`)."""


@dataclasses.dataclass
class IA3Config(TargetedConfig):
    """(IA)³ settings; names and defaults follow peft's `IA3Config` (`fan_in_fan_out` is not a field:
    the layout comes from the layer type, as peft corrects it to)."""

    feedforward_modules: list[str] | Regex | None = None
    """Targets whose input is rescaled instead of their output: names matched as the end of the full name
    (peft's rule for this field: a plain suffix, no dot needed), or one regular expression (`re.fullmatch`).
    Every name in a list must also be in a `target_modules` list. `None`: peft's default for the model type."""
    init_ia3_weights: bool = True
    """True: l = 1 (the model starts equal to the base); False: l ~ N(0, 1) (for tests)."""

    def normalise(self) -> None:
        super().normalise()
        if not isinstance(self.feedforward_modules, str):
            self.feedforward_modules = _as_name_list(self.feedforward_modules)

    def validate(self) -> None:
        super().validate()
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list):
            missing = [name for name in feedforward if name not in targets]
            if missing:
                raise DeltaTuneError(
                    f"feedforward_modules entry {missing[0]!r} is not in target_modules {targets!r}: a feed-forward "
                    "layer must be one of the targets; add it to target_modules or drop it"
                )


def is_feedforward(module_name: str, feedforward: list[str] | str) -> bool:
    """peft's rule: a regular expression matches the whole name, a list entry its end."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module_name) is not None
    return any(module_name.endswith(entry) for entry in feedforward)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How (IA)³ meets one type of layer."""

    features: Callable[[nn.Module], tuple[int, int]]
    """(in features, out features)."""
    channel_axis: int
    """The features' axis of the layer's input and output: -1 (linear layers) or 1 (convolutions)."""
    weight_scale: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor]
    """(module, l flattened, feedforward) → l viewed to multiply the weight along the scaled axis."""
    weight: Callable[[nn.Module], torch.Tensor] = lambda module: module.weight.detach()
    """The weight a merge scales: a quantized layer's dequantized (a merge writes it into a float copy)."""


def _linear_scale(module: nn.Module, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
    return vector.view(1, -1) if feedforward else vector.view(-1, 1)  # weight: out × in


def _conv1d_scale(module: nn.Module, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
    return vector.view(-1, 1) if feedforward else vector.view(1, -1)  # GPT-2 Conv1D weight: in × out


def _conv_scale(module: nn.Module, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """Conv weight out × in/groups × kernel: an output scale per row; an input scale at each output row's
    own input channels (row o reads the channels of its group, o // (out / groups))."""
    kernel = (1,) * (module.weight.dim() - 2)
    if not feedforward:
        return vector.view(-1, 1, *kernel)
    groups, per_group = module.groups, module.in_channels // module.groups
    by_row = vector.view(groups, 1, per_group).expand(groups, module.out_channels // groups, per_group)
    return by_row.reshape(module.out_channels, per_group, *kernel)


def _quantized_features(module: nn.Module) -> tuple[int, int]:
    row = quantized_linear(module)
    return row.in_features(module), row.out_features(module)


def _conv1d_kind() -> tuple[type, LayerKind]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D, LayerKind(lambda module: tuple(module.weight.shape), -1, _conv1d_scale)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    row = quantized_linear(module)  # bitsandbytes, quanto, GGUF, or torchao's quantized weight on a Linear
    return module.weight.detach() if row is None else row.dequantize(module)


LINEAR = LayerKind(lambda module: (module.in_features, module.out_features), -1, _linear_scale, _linear_weight)
QUANTIZED = dataclasses.replace(LINEAR, features=_quantized_features)
CONV = LayerKind(lambda module: (module.in_channels, module.out_channels), 1, _conv_scale)
LAYER_KINDS: dict[type | str, LayerKind] = {
    **dict.fromkeys(QUANTIZED_LINEARS, QUANTIZED),
    nn.Linear: LINEAR,
    **dict([_conv1d_kind()]),
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
}


class IA3Scale(SiteAdapter):
    """The vector `ia3_l` of one layer, shaped as peft stores it; subclasses apply it to the output or input."""

    feedforward = False

    def __init__(self, module: nn.Module, module_name: str, config: IA3Config) -> None:
        super().__init__()
        self.kind = lookup_type(LAYER_KINDS, type(module))
        in_features, out_features = self.kind.features(module)
        features = in_features if self.feedforward else out_features
        if self.kind.channel_axis == 1:
            shape = (1, features, *(1,) * (module.weight.dim() - 2))
        else:
            shape = (1, features) if self.feedforward else (features, 1)
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        initial = torch.ones if config.init_ia3_weights else torch.randn
        self.ia3_l = nn.Parameter(initial(shape, dtype=dtype, device=weight.device))

    def along_features(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """`values` (features,) or per row (rows, features), viewed to multiply an activation of `ndim` dims."""
        rows, ones = values.shape[:-1], (1,) * (ndim - 2)
        if self.kind.channel_axis == 1:
            return values.view(*rows, -1, *ones)
        return values.view(*rows, *ones, -1)

    def scaled(self, activation: torch.Tensor) -> torch.Tensor:
        """l ⊙ activation, computed in l's dtype and returned in the activation's (peft's casts)."""
        vector = self.along_features(self.ia3_l.view(-1), activation.dim())
        if activation.dtype == vector.dtype:
            return activation * vector
        return (activation.to(vector.dtype) * vector).to(activation.dtype)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        change = self.ia3_l.detach().float().view(-1) - 1
        weight = self.kind.weight(module).float()
        deltas = {"weight": weight * self.kind.weight_scale(module, change, self.feedforward)}
        if not self.feedforward and getattr(module, "bias", None) is not None:
            deltas["bias"] = module.bias.detach().float() * change
        return deltas

    def extra_repr(self) -> str:
        return f"features={self.ia3_l.numel()}, scales={'input' if self.feedforward else 'output'}"


class IA3OutputScale(IA3Scale):
    """y = l ⊙ (W x + b)."""

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.scaled(output)

    def forward_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return put_rows(output, self.scaled(output.index_select(0, rows)), rows)


class IA3InputScale(IA3Scale):
    """y = W (l ⊙ x) + b: x is rescaled before the layer runs (the output is then the layer's own)."""

    feedforward = True

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        return (self.scaled(args[0]), *args[1:]), kwargs

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        """Each row of x times its adapter's l (ones for rows of no input-scaling adapter), one product."""
        x = args[0]
        vector = self.ia3_l.view(-1)
        table = torch.ones((x.shape[0], vector.numel()), dtype=vector.dtype, device=x.device)
        for adapter, name, rows in groups:
            if not isinstance(adapter, IA3InputScale):
                raise DeltaTuneError(
                    f"a mixed batch cannot combine (IA)³ input scaling with {type(adapter).__name__} at one layer; "
                    "run these adapters in separate batches"
                )
            expanded = state.expanded_rows(name, rows, x.shape[0], x.device)
            own = adapter.ia3_l.view(1, -1).to(vector.dtype)
            table = table.index_copy(0, expanded, own.expand(len(expanded), -1))
        scales = self.along_features(table, x.dim())
        scaled = x * scales if x.dtype == scales.dtype else (x.to(scales.dtype) * scales).to(x.dtype)
        return (scaled, *args[1:]), kwargs

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output


class IA3Peft(PeftCodec):
    """(IA)³ in peft's files: `<module path>.ia3_l`, targets and feed-forward layers as full module names."""

    peft_type = "IA3"
    tensor_names = {IA3Scale: {"ia3_l": "ia3_l"}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, IA3_READ, IA3_TOLERATED)

    def config_to_peft(self, config: IA3Config, targets: list[str], model: nn.Module) -> dict[str, Any]:
        conv1d_type = _conv1d_kind()[0]
        feedforward = _feedforward_spec(config, model)
        return {
            "target_modules": targets,
            "feedforward_modules": [name for name in targets if is_feedforward(name, feedforward)],
            "fan_in_fan_out": any(isinstance(model.get_submodule(name), conv1d_type) for name in targets),
            "init_ia3_weights": config.init_ia3_weights,
        }

    def config_from_peft(self, data: dict[str, Any]) -> IA3Config:
        fields = {key: data[key] for key in IA3_READ if data.get(key) is not None}
        if isinstance(fields.get("feedforward_modules"), list) and isinstance(fields.get("target_modules"), list):
            fields["feedforward_modules"] = [n for n in fields["feedforward_modules"] if n in fields["target_modules"]]
        return IA3Config(**fields)


def _feedforward_spec(config: IA3Config, model: nn.Module) -> list[str] | str:
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_FEEDFORWARD:
        return DEFAULT_FEEDFORWARD[model_type]
    raise TargetNotFoundError(
        f"IA3Config needs feedforward_modules for this model ({model_type or type(model).__name__}): pass the "
        "names of the targets whose input is rescaled, or [] for none"
    )


@register("ia3")
class IA3(ModuleMethod):
    """(IA)³ on the selected Linear, Conv1D, Conv2d / Conv3d and quantized linear layers."""

    config_class = IA3Config
    adapter_types = dict.fromkeys(LAYER_KINDS, IA3OutputScale)
    peft_codec = IA3Peft()
    targets_by_model_type = DEFAULT_TARGETS

    def attach(self, placement: Placement, config: IA3Config) -> None:
        """An input scale at each target the feed-forward spec names, an output scale at the others."""
        model = placement.model
        feedforward = _feedforward_spec(config, model)
        built = {
            target: (IA3InputScale if is_feedforward(target, feedforward) else IA3OutputScale)(
                model.get_submodule(target), target, config
            )
            for target in self.select(model, config)
        }
        for target, adapter in built.items():
            placement.put(target, adapter)
