"""What LoHa (`loha.py`) and LoKr (`lokr.py`) share: the LyCORIS family as peft 0.21 implements it.

Each method builds an update ΔW of a layer's weight from small factors (a Hadamard or a Kronecker
product of low-rank matrices) and adds its output to the layer's:

    y = W x + b + s · ΔW x        s = alpha / r  (the rank and alpha of `rank_pattern` / `alpha_pattern`)

Shapes: a linear layer's ΔW is out × in; a convolution's out × in/groups × kernel, applied with the
layer's own stride, padding, dilation and groups. Layers: `nn.Linear`, transformers' `Conv1D` (GPT-2;
weight stored in × out, ΔW is kept out × in and transposed only for merging; peft refuses these
layers, so such adapters save in deltatune's format only), `nn.Conv1d`, `nn.Conv2d`, and the quantized
linears of `deltatune.quantized` (shapes from the logical in/out features; merging needs the weight
dequantized).

Training only, as in peft:
- module dropout: with probability `module_dropout` a call skips the adapter altogether;
- rank dropout: each output feature of ΔW is kept with probability 1 − `rank_dropout` (a fresh mask
  per call), the kept ones rescaled by 1 / (the kept fraction) where the method rescales (LoHa
  always, LoKr with `rank_dropout_scale`). A mask that keeps nothing gives ΔW = 0 (peft: 0/0).

ΔW never reads the layer's weight, so merging adds s·ΔW and unmerging subtracts it again
(`delta_parameters`). A method's adapter gives `delta_weight()` (s·ΔW in the layer's weight layout, with
autograd); where its factors give a cheaper product with x than ΔW x on a linear layer, it sets
`factored` and gives `factored_output(x)` instead, which the forward then uses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetedConfig
from ..errors import DeltaTuneError
from ..field_check import DropoutRate, PositiveInt, Regex
from ..peft_format import PeftCodec
from ..peft_keys import check_method_keys
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..site_adapter import SiteAdapter
from ..targeting import pattern_value
from .base import ModuleMethod, lookup_type
from .lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS


@dataclasses.dataclass
class LycorisConfig(TargetedConfig):
    """The settings LoHa and LoKr share; names and defaults follow peft's `LycorisConfig` family."""

    r: PositiveInt = 8
    """Rank of the low-rank factors."""
    alpha: float = 8
    """Scale numerator: s = alpha / r."""
    rank_dropout: DropoutRate = 0.0
    """In training, the probability of dropping each output feature of ΔW (a fresh mask per call)."""
    module_dropout: DropoutRate = 0.0
    """In training, the probability that a call skips the adapter at a module altogether."""
    use_effective_conv2d: bool = False
    """Convolutions with a kernel larger than 1: factor the kernel through a small core tensor (the
    Tucker / CP form of FedPara's Proposition 3) instead of flattening it into the input features."""
    init_weights: bool = True
    """True: one factor starts at zero, so the model starts equal to the base. False: every factor random
    (for tests: the adapter changes the output from the start)."""
    rank_pattern: dict[Regex, PositiveInt] = dataclasses.field(default_factory=dict)
    """{module name pattern: rank} overriding `r` for matching modules (peft's matching rule)."""
    alpha_pattern: dict[Regex, float] = dataclasses.field(default_factory=dict)
    """{module name pattern: alpha} overriding `alpha` for matching modules."""

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """The weight a ΔW is made for: out × in (× kernel), `in_features` per group for convolutions."""

    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    """() for linear layers."""
    transposed: bool = False
    """The layer stores its weight in × out (transformers' Conv1D)."""

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def flat_in_features(self) -> int:
        """Input features times kernel positions: the columns of ΔW flattened to a matrix."""
        return self.in_features * math.prod(self.kernel_size)

    @property
    def has_kernel(self) -> bool:
        """A convolution whose kernel covers more than one position (where the core-tensor form applies)."""
        return math.prod(self.kernel_size) > 1


def _linear_shape(module: nn.Linear) -> LayerShape:
    return LayerShape(module.out_features, module.in_features)


def _conv1d_transformers_shape(module: nn.Module) -> LayerShape:
    in_features, out_features = module.weight.shape
    return LayerShape(out_features, in_features, transposed=True)


def _conv_shape(module: nn.Conv1d | nn.Conv2d) -> LayerShape:
    return LayerShape(module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size))


def _quantized_shape(module: nn.Module) -> LayerShape:
    row = quantized_linear(module)
    return LayerShape(row.out_features(module), row.in_features(module))


def _layer_shapes() -> dict[type | str, Any]:
    from transformers.pytorch_utils import Conv1D

    return {
        **dict.fromkeys(QUANTIZED_LINEARS, _quantized_shape),
        nn.Linear: _linear_shape,
        Conv1D: _conv1d_transformers_shape,
        nn.Conv1d: _conv_shape,
        nn.Conv2d: _conv_shape,
    }


LAYER_SHAPES = _layer_shapes()
"""Layer type → the shape of its ΔW; also the layers LoHa and LoKr adapt."""


def kaiming(parameter: torch.Tensor) -> None:
    """peft's (and torch's `nn.Linear`) default: Kaiming-uniform with a = √5."""
    nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))


def _linear_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _conv_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ΔW applied as the layer applies its weight: stride, padding (mode included), dilation, groups."""
    return module._conv_forward(x, weight, None)


class LycorisAdapter(SiteAdapter):
    """One LoHa or LoKr adapter at one layer: scaling, dropout, and ΔW applied as a second weight.

    A subclass lists its possible tensors in `tensor_names` (peft's names, which are also ours), makes
    those its shapes need with `new_factor` and initialises them, and gives `delta_weight()`."""

    delta_reads_module = False
    tensor_names: ClassVar[tuple[str, ...]] = ()
    rescales_rank_dropout: bool = True
    factored: bool = False
    """Whether `factored_output` computes s · ΔW x (set per linear layer, from the shapes)."""

    def __init__(self, module: nn.Module, module_name: str, config: LycorisConfig) -> None:
        super().__init__()
        self.shape: LayerShape = lookup_type(LAYER_SHAPES, type(module))(module)
        self.rank = config.rank_for(module_name)
        self.alpha = config.alpha_for(module_name)
        self.scaling = self.alpha / self.rank
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        weight = module.weight
        self._factory = {  # for the factors made at construction; they move and cast with the module later
            "dtype": weight.dtype if weight.is_floating_point() else torch.float32,
            "device": weight.device,
        }
        self.product = _conv_product if self.shape.kernel_size else _linear_product

    def new_factor(self, name: str, *shape: int) -> nn.Parameter:
        """Register the factor `name` (one of `tensor_names`), uninitialised."""
        parameter = nn.Parameter(torch.empty(shape, **self._factory))
        self.register_parameter(name, parameter)
        return parameter

    def delta_weight(self) -> torch.Tensor:
        """s · ΔW in the layer's weight layout (out, in, *kernel), in the factors' dtype, with autograd."""
        raise NotImplementedError

    def factored_output(self, x: torch.Tensor) -> torch.Tensor:
        """s · ΔW x for a linear layer, from the factors (only where `factored`)."""
        raise NotImplementedError

    def kept_features(self, like: torch.Tensor) -> torch.Tensor | None:
        """Rank dropout: this call's mask over ΔW's output features (dtype and device of `like`), rescaled
        where the method rescales; None when nothing drops (evaluation, or `rank_dropout` 0)."""
        if not (self.training and self.rank_dropout > 0):
            return None
        kept = (torch.rand(self.shape.out_features, device=like.device) > self.rank_dropout).to(like.dtype)
        if self.rescales_rank_dropout:
            kept = kept / kept.mean().clamp_min(1 / self.shape.out_features)
        return kept

    def skips_this_call(self) -> bool:
        """Module dropout: in training, the adapter sits out a call with probability `module_dropout`."""
        return self.training and self.module_dropout > 0 and bool(torch.rand(()) < self.module_dropout)

    def delta_output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """s · (ΔW, rank-dropped) applied to x."""
        x = x.to(next(iter(self._parameters.values())).dtype)
        kept = self.kept_features(x)
        if self.factored:
            delta = self.factored_output(x)
            return delta if kept is None else delta * kept
        weight = self.delta_weight()
        if kept is not None:
            weight = weight * kept.view(-1, *([1] * (weight.dim() - 1)))
        return self.product(module, x, weight)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.skips_this_call():
            return output
        return output + self.delta_output(module, args[0]).to(output.dtype)

    def forward_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Mixed batch: the delta of the chosen rows only, added into them."""
        if self.skips_this_call():
            return output
        delta = self.delta_output(module, args[0].index_select(0, rows)).to(output.dtype)
        if torch.is_grad_enabled():
            return output.index_add(0, rows, delta)
        return output.index_add_(0, rows, delta)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            delta = self.delta_weight().float()
        return {"weight": delta.t() if self.shape.transposed else delta}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, factored={self.factored}"


class LycorisMethod(ModuleMethod):
    """LoHa or LoKr on the selected Linear, Conv1D, Conv1d and Conv2d layers; peft's default targets."""

    config_class: type[LycorisConfig] = LycorisConfig
    targets_by_model_type = LORA_DEFAULT_TARGETS  # peft maps the LyCORIS methods' defaults to LoRA's


class LycorisPeft(PeftCodec):
    """A LyCORIS method in peft's files: its math fields under peft's names, the targets, ranks and alphas
    as resolved full module names (peft adapts exactly these modules with the same shapes), and the
    factors under their own names after the module path (`<path>.hada_w1_a`)."""

    adapter_class: ClassVar[type[LycorisAdapter]] = LycorisAdapter
    config_class: ClassVar[type[LycorisConfig]] = LycorisConfig
    math_fields: ClassVar[tuple[str, ...]] = ()
    """The config fields written as they are (besides targets and patterns)."""
    read_keys: ClassVar[tuple[str, ...]] = ()
    """The keys of peft's config that become our config's fields."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.tensor_names = {cls.adapter_class: {name: name for name in cls.adapter_class.tensor_names}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, self.read_keys)

    def config_to_peft(self, config: LycorisConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        refused = [name for name in targets if isinstance(model.get_submodule(name), Conv1D)]
        if refused:
            raise DeltaTuneError(
                f"peft's {self.peft_type} does not adapt transformers' Conv1D layers such as {refused[0]!r} (GPT-2), "
                "so it could not load this adapter; save it with format='deltatune'"
            )
        return {
            **{name: getattr(config, name) for name in self.math_fields},
            "target_modules": targets,
            "rank_pattern": {re.escape(n): config.rank_for(n) for n in targets if config.rank_for(n) != config.r},
            "alpha_pattern": {
                re.escape(n): config.alpha_for(n) for n in targets if config.alpha_for(n) != config.alpha
            },
        }

    def config_from_peft(self, data: dict[str, Any]) -> LycorisConfig:
        return self.config_class(**{key: data[key] for key in self.read_keys if data.get(key) is not None})
