"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247;
parallel: He et al. 2021, arXiv:2110.04366), placed as AdapterHub places them.

A small MLP on a sublayer's output h (x is the residual stream entering the sublayer):

    u = s · (W_up f(W_down z + b_down) + b_up)      W_down: size × hidden, W_up: hidden × size
    h ← h + dropout(u)                              size = hidden / reduction_factor

    houlsby   z = h, after the attention and the FFN output          (AdapterHub `double_seq_bn`)
    pfeiffer  z = LN(h + x), after the FFN output only               (AdapterHub `seq_bn`)
    parallel  z = x, after the FFN output, s = 4, zero W_up          (AdapterHub `par_bn`)

In a post-LN model (BERT) the block then computes LN(h + x), so Houlsby gives LN(A(h) + h + x). The
Pfeiffer input LN(h + x) applies the block's own pretrained norm (`original_ln_before`): the block
then computes LN(A(LN(h + x)) + h + x), the pretrained norm twice, exactly as AdapterHub does; in a
pre-LN model (no norm after the sublayer) z = h + x. The hook sits on the sublayer's output module
(`architectures`); x comes from an `InputTap` at the module that receives the residual stream (it shares
that site's one forward pre-hook with every other adapter there).
`use_gating` multiplies u by a learned gate g = mean_t σ(W_g z_t + b_g) per example (UniPELT's,
`gating`). Not mergeable (f is non-linear). Compacter (`compacter.py`) is this adapter with other linears.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..architectures import SublayerSite, check_override, input_of, sublayer_output_width, sublayer_sites
from ..config import DeltaConfig
from ..errors import DeltaTuneError
from ..field_check import DropoutRate, NonNegativeInt, PositiveFloat, PositiveInt
from ..placement import Placement
from ..registry import register
from ..site_adapter import ObservingAdapter, SiteAdapter
from .gating import gate_value, make_gate

PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": dict(
        attention_adapter=True,
        ffn_adapter=True,
        parallel=False,
        original_ln_before=False,
        reduction_factor=16,
        non_linearity="swish",
        scaling=1.0,
        init_weights="bert",
    ),
    "pfeiffer": dict(
        attention_adapter=False,
        ffn_adapter=True,
        parallel=False,
        original_ln_before=True,
        reduction_factor=16,
        non_linearity="relu",
        scaling=1.0,
        init_weights="bert",
    ),
    "parallel": dict(
        attention_adapter=False,
        ffn_adapter=True,
        parallel=True,
        original_ln_before=False,
        reduction_factor=2,
        non_linearity="relu",
        scaling=4.0,
        init_weights="zero_up",
    ),
}


@dataclasses.dataclass
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapter settings. Fields left `None` take the value of `preset`."""

    preset: str = "houlsby"
    """"houlsby" (attention + FFN), "pfeiffer" (FFN, input LN(h + x)) or "parallel" (FFN, input x)."""
    attention_adapter: bool | None = None
    """An adapter after each attention sublayer's output."""
    ffn_adapter: bool | None = None
    """An adapter after each feed-forward sublayer's output."""
    parallel: bool | None = None
    """The adapter reads the sublayer's input x instead of its output h."""
    original_ln_before: bool | None = None
    """The adapter reads LN(h + x) with the block's own norm (h + x in pre-LN models)."""
    reduction_factor: PositiveFloat | None = None
    """Bottleneck size = hidden size // reduction_factor (at least 1)."""
    bottleneck_size: PositiveInt | None = None
    """An explicit bottleneck size; overrides `reduction_factor`."""
    non_linearity: str | None = None
    """f: a transformers activation name ("swish", "relu", "gelu", ...) or "leakyrelu"."""
    scaling: float | None = None
    """s, the factor on the adapter's output."""
    init_weights: str | None = None
    """"bert": W ~ N(0, 0.02), biases 0; "near_identity": truncated N(0, 0.01); "zero_up": W_down
    Kaiming-uniform, W_up and b_up zero (the model starts equal to the base)."""
    dropout: DropoutRate = 0.0
    """Dropout on the adapter's output u."""
    use_gating: bool = False
    """Multiply u by a learned gate of the adapter's input (UniPELT; AdapterHub's `use_gating`)."""
    leave_out: list[NonNegativeInt] = dataclasses.field(default_factory=list)
    """Layer indices (0-based, in model order; T5/BART decoders after the encoder) without adapters."""
    architecture: dict[str, str] | None = None
    """Names the blocks and sublayer modules when the built-in map and the search cannot (see
    `deltatune.architectures`); keys: blocks, attention_output, ffn_output, attention_input,
    ffn_input, attention_layer_norm, ffn_layer_norm, input_argument."""

    def normalise(self) -> None:
        if self.preset not in PRESETS:
            raise DeltaTuneError(f"unknown bottleneck preset {self.preset!r}; use one of {sorted(PRESETS)}")
        for key, value in self.preset_values().items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.leave_out = sorted(set(self.leave_out))
        super().normalise()

    def preset_values(self) -> dict[str, Any]:
        return PRESETS[self.preset]

    def validate(self) -> None:
        if not (self.attention_adapter or self.ffn_adapter):
            raise DeltaTuneError("set attention_adapter or ffn_adapter (or both): the config places no adapter")
        if self.parallel and self.original_ln_before:
            raise DeltaTuneError("a parallel adapter reads x, so original_ln_before must be False")
        if self.init_weights not in INITS:
            raise DeltaTuneError(f"init_weights must be one of {sorted(INITS)}, got {self.init_weights!r}")
        if self.architecture is not None:
            check_override(self.architecture)
        activation(self.non_linearity)

    def size_for(self, hidden: int) -> int:
        return self.bottleneck_size or max(1, int(hidden // self.reduction_factor))


def activation(name: str) -> nn.Module:
    """The non-linearity f by name (transformers' table, plus "leakyrelu")."""
    from transformers.activations import ACT2FN

    if name.lower() == "leakyrelu":
        return nn.LeakyReLU()
    if name.lower() not in ACT2FN:
        raise DeltaTuneError(f"unknown non_linearity {name!r}; use one of {sorted(ACT2FN)} or 'leakyrelu'")
    return ACT2FN[name.lower()]


def _bert_init(down: nn.Linear, up: nn.Linear) -> None:
    for linear in (down, up):
        nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)


def _near_identity_init(down: nn.Linear, up: nn.Linear) -> None:
    for linear in (down, up):
        nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(linear.bias)


def _zero_up_init(down: nn.Linear, up: nn.Linear) -> None:
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(down.bias)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)


INITS: dict[str, Callable[[nn.Linear, nn.Linear], None]] = {
    "bert": _bert_init,
    "near_identity": _near_identity_init,
    "zero_up": _zero_up_init,
}


class TappedInput:
    """x of the current call, from the tap to the adapter that reads it: set when the input module is
    called, dropped when the reading adapter's module has run (even if it raised) or, when a call raised
    before that module ran, at the end of the `DeltaModel` call (`call_ended`), so x never outlives its
    call. Not a module: both hold it as a plain attribute."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self, rows: torch.Tensor | None) -> torch.Tensor:
        if self.value is None:
            raise DeltaTuneError(
                "the sublayer input was not seen before its output; check the adapter config's architecture map"
            )
        return self.value if rows is None else self.value.index_select(0, rows)


class InputTap(ObservingAdapter):
    """At the module that receives the residual stream: record x (its input `argument`) on every call,
    whichever adapters are active, for the bottleneck adapter at the sublayer's output."""

    def __init__(self, argument: str, tapped: TappedInput) -> None:
        super().__init__()
        self.argument = argument
        self.__dict__["tapped"] = tapped

    def observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.tapped.value = input_of(args, kwargs, self.argument)


class BottleneckAdapter(SiteAdapter):
    """One bottleneck adapter on one sublayer output; `down` and `up` are any modules mapping
    hidden → size → hidden (`nn.Linear` here, PHM or low-rank layers for Compacter)."""

    def __init__(
        self,
        down: nn.Module,
        up: nn.Module,
        hidden: int,
        config: BottleneckConfig,
        tap: TappedInput | None,
        layer_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.down, self.up = down, up
        self.hidden = hidden
        self.activation = activation(config.non_linearity)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.parallel = config.parallel
        self.original_ln_before = config.original_ln_before
        self.gate = make_gate(hidden, 1, next(up.parameters())) if config.use_gating else None
        self.__dict__["tap"] = tap  # plain attributes: not parameters of the adapter
        self.__dict__["layer_norm"] = layer_norm

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}, parallel={self.parallel}, original_ln_before={self.original_ln_before}"

    def adapter_input(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """z: what the bottleneck reads (h, x, LN(h + x) or h + x); `rows` selects a mixed batch's rows."""
        if self.parallel:
            return self.tap.take(rows)
        if not self.original_ln_before:
            return h
        summed = h + self.tap.take(rows)
        return summed if self.layer_norm is None else self.layer_norm(summed)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """up(f(down(z))), unscaled, in z's dtype."""
        dtype = next(self.up.parameters()).dtype
        return self.up(self.activation(self.down(z.to(dtype)))).to(z.dtype)

    def gated(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """u · g(z) with `use_gating`, else u."""
        return u if self.gate is None else u * gate_value(self.gate, z)

    def up_output(self, z: torch.Tensor) -> torch.Tensor:
        """u = s · up(f(down(z))) (· g when gated), in z's dtype."""
        return self.gated(self.scaling * self.bottleneck(z), z)

    def adapt(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h + dropout(u) (· g when gated), with s applied by the addition (dropout commutes with it)."""
        z = self.adapter_input(h, rows)
        return torch.add(h, self.dropout(self.gated(self.bottleneck(z), z)), alpha=self.scaling)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.adapt(output)

    def forward_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        return output.index_copy(0, rows, self.adapt(output.index_select(0, rows), rows))

    def shared_file_keys(self) -> set[str]:
        """Keys of tensors shared with other layers that another site saves (`shared_keys` of a
        projection: Compacter's rule matrices, stored once per adapter)."""
        return {f"{role}.{key}" for role in ("down", "up") for key in getattr(getattr(self, role), "shared_keys", ())}

    def file_state(self) -> dict[str, torch.Tensor]:
        skipped = self.shared_file_keys()
        return {key: value for key, value in self.state_dict().items() if key not in skipped}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(tensors, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - self.shared_file_keys():
            raise DeltaTuneError(
                f"adapter tensors do not fit: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
            )

    def call_ended(self) -> None:
        if self.tap is not None:
            self.tap.value = None


@register("bottleneck")
class Bottleneck:
    """Bottleneck adapters on the sublayers the config places them at, in every block not left out."""

    config_class = BottleneckConfig

    def make_projections(
        self, hidden: int, size: int, config: Any, shared: Any, reference: torch.Tensor
    ) -> tuple[nn.Module, nn.Module]:
        """W_down and W_up, initialised per `config.init_weights`."""
        factory = {"dtype": reference.dtype, "device": reference.device}
        down, up = nn.Linear(hidden, size, **factory), nn.Linear(size, hidden, **factory)
        with torch.no_grad():
            INITS[config.init_weights](down, up)
        return down, up

    def shared_parameters(self, hidden: int, size: int, config: Any, reference: torch.Tensor) -> Any:
        """Parameters every layer's adapter shares (Compacter's rule matrices); none here."""
        return None

    def attach(self, placement: Placement, config: BottleneckConfig) -> None:
        model = placement.model
        sites = placed_sites(model, config)
        first = model.get_submodule(sites[0].output)
        hidden = sublayer_output_width(model, first)
        reference = weight_reference(model.get_submodule(sites[0].block))
        size = config.size_for(hidden)
        shared = self.shared_parameters(hidden, size, config, reference)
        for site in sites:
            down, up = self.make_projections(hidden, size, config, shared, reference)
            tap = TappedInput() if config.parallel or config.original_ln_before else None
            layer_norm = model.get_submodule(site.layer_norm) if site.layer_norm and config.original_ln_before else None
            if tap is not None:
                placement.put(site.input, InputTap(site.input_argument, tap), target=False, layer=site.layer)
            placement.put(site.output, BottleneckAdapter(down, up, hidden, config, tap, layer_norm), layer=site.layer)


def weight_reference(block: nn.Module) -> torch.Tensor:
    """A tensor with the device and dtype the adapter weights of `block` take: its first floating-point
    parameter. In a block whose linear layers are quantized their stored weights may be integers (packed
    4-bit, int8), so a norm's weight then; float32 on the block's device where it has none."""
    parameters = list(block.parameters())
    floating = next((parameter for parameter in parameters if parameter.is_floating_point()), None)
    if floating is not None:
        return floating
    return torch.empty(0, dtype=torch.float32, device=parameters[0].device if parameters else "cpu")


def placed_sites(model: nn.Module, config: BottleneckConfig) -> list[SublayerSite]:
    """The sublayer sites a config puts adapters on."""
    kinds = {"attention": config.attention_adapter, "ffn": config.ffn_adapter}
    sites = [
        site
        for site in sublayer_sites(model, config.architecture)
        if kinds[site.kind] and site.layer not in config.leave_out
    ]
    if not sites:
        raise DeltaTuneError(
            f"the config places no adapter on this model (leave_out={config.leave_out} leaves out every layer)"
        )
    return sites
