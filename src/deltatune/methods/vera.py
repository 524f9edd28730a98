"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454), as peft 0.21 computes it.

    y = W x + b + λ_b ⊙ (B_l (λ_d ⊙ (A_l dropout(x))))       ΔW = diag(λ_b) B_l diag(λ_d) A_l

A (r × in_max) and B (out_max × r) are frozen random matrices, one pair per adapter, shared by every
layer it adapts: in_max / out_max are the largest input / output widths among its targets, and a layer
of width (in, out) reads the slices A_l = A[:, :in] and B_l = B[:out, :]. Only the vectors λ_b (out)
and λ_d (r) train: λ_b starts at zero and λ_d at `d_initial`, so the model starts as the base.

A and B are drawn from `projection_prng_key` as peft draws them, bit for bit: a CPU `torch.Generator`
seeded with the key fills A, then B, with Kaiming-uniform values (bound √3 · √2 / √fan_in, fan_in the
second dimension), in float32.

Where the shared pair lives: in one `VeraProjections` module (buffers `vera_A`, `vera_B`), a child of
the adapter at the first target only, so it is part of the model's module tree exactly once: it moves
and casts with the model (`.to`, `.half`, `keep_in_float32`), appears once in `state_dict`, and is
dropped with the adapter. The other layers hold a plain reference to it (not a child) and slice it at
forward time, so they always read its current tensors, wherever `.to` put them (a layer on another
device copies its slice over, as peft does). Not a child of every layer: `state_dict` would then list
it once per layer (peft's does, and strips the copies when it saves). Not a buffer beside the model:
a method only places adapters at modules (`Placement`), and a tensor outside the model's module tree
would not follow `model.to(...)`. Files store it once too: ours as `<first target>.vera_A`,
peft's as `base_model.vera_A` / `base_model.vera_B`; with `save_projection=False` neither is written
and a load draws them again from the key.

Each adapter has its own pair, drawn from its own config (key, r, targets). peft makes every VeRA
adapter of one model share the first one's pair and requires one key for all of them; adapters that
differ in key or r load there only one at a time. Layers: `nn.Linear`, GPT-2's `Conv1D` (weight in × out)
and the quantized linears of `deltatune.quantized` (float32 λ; a merge needs the weight dequantized).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetedConfig
from ..field_check import DropoutRate, PositiveInt, Range
from ..peft_format import PeftCodec
from ..peft_keys import VERA_READ, VERA_REFUSED, VERA_TOLERATED, check_method_keys, vera_fields
from ..placement import Placement
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..registry import register
from ..site_adapter import SiteAdapter
from .base import ModuleMethod
from .lora import DEFAULT_TARGETS

PROJECTION_NAMES = ("vera_A", "vera_B")
GeneratorSeed = Annotated[int, Range(minimum=-(2**63), maximum=2**64 - 1)]
"""The seeds a `torch.Generator` accepts."""


@dataclasses.dataclass
class VeraConfig(TargetedConfig):
    """VeRA settings; names and defaults follow peft's `VeraConfig`."""

    r: PositiveInt = 256
    """Rows of A (columns of B): the rank of the random projections, and the length of λ_d. VeRA trains
    only λ_b and λ_d, so it takes far higher ranks than LoRA for the same parameter count."""
    projection_prng_key: GeneratorSeed = 0
    """Seed of the generator that draws A and B (the same key gives the same matrices as peft, bit for
    bit); also how a file saved without them gets them back."""
    save_projection: bool = True
    """Write A and B into saved files (once per adapter). False: only the key is saved and a load draws
    them again, which relies on torch's generator giving the same numbers on the loading machine."""
    vera_dropout: DropoutRate = 0.0
    """Dropout on the input of the VeRA path, in training only."""
    d_initial: float = 0.1
    """Starting value of every entry of λ_d (small values, ≤ 0.1, train best: the paper's Table 6c)."""
    init_weights: bool = True
    """True: λ_b = 0 and λ_d = d_initial (the model starts equal to the base); False: λ_b = 1 and
    λ_d ~ N(0, 1) (for tests: the adapter changes the output from the start)."""


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A float32 (rows × fan_in) CPU tensor drawn uniformly in ±√3 · (√2 / √fan_in) from `generator`
    (the bound computed in this order, as peft does, so that the values match bit for bit)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen shared pair of one adapter: `vera_A` (r × in_max), `vera_B` (out_max × r)."""

    def __init__(self, rank: int, in_features: int, out_features: int, key: int, device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.register_buffer("vera_A", kaiming_uniform((rank, in_features), generator).to(device))
        self.register_buffer("vera_B", kaiming_uniform((out_features, rank), generator).to(device))


def layer_widths(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an `nn.Linear` (weight out × in), a GPT-2 `Conv1D` (weight in × out) or a quantized
    linear (its logical widths: the packed weight's shape says nothing)."""
    row = quantized_linear(module)
    if row is not None:
        return row.in_features(module), row.out_features(module)
    rows, columns = module.weight.shape
    return (columns, rows) if isinstance(module, nn.Linear) else (rows, columns)


class VeraLinear(SiteAdapter):
    """VeRA on one `nn.Linear` or `Conv1D`: trained λ_b, λ_d; the adapter's shared A, B sliced to the layer."""

    delta_reads_module = False

    def __init__(self, module: nn.Module, config: VeraConfig, projections: VeraProjections, owns: bool) -> None:
        super().__init__()
        self.transposed = not isinstance(module, nn.Linear)
        self.in_features, self.out_features = layer_widths(module)
        weight = module.weight
        factory = {"dtype": weight.dtype if weight.is_floating_point() else torch.float32, "device": weight.device}
        self.vera_lambda_b = nn.Parameter(torch.empty(self.out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.empty(config.r, **factory))
        self.dropout_probability = config.vera_dropout
        self.shared = (projections,)
        """The adapter's pair, by reference (a tuple, so it is not a child of every layer)."""
        self.saves_projections = owns and config.save_projection
        if owns:
            self.projections = projections
        with torch.no_grad():
            if config.init_weights:
                self.vera_lambda_b.zero_()
                self.vera_lambda_d.fill_(config.d_initial)
            else:
                self.vera_lambda_b.fill_(1.0)
                self.vera_lambda_d.normal_()

    def sliced(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :in], B[:out, :]) on `device` in `dtype`."""
        projections = self.shared[0]
        return (
            projections.vera_A[:, : self.in_features].to(device=device, dtype=dtype),
            projections.vera_B[: self.out_features, :].to(device=device, dtype=dtype),
        )

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """λ_b ⊙ (B_l (λ_d ⊙ (A_l dropout(x)))) in the adapter's dtype."""
        x = x.to(self.vera_lambda_d.dtype)
        if self.training and self.dropout_probability > 0:
            x = F.dropout(x, self.dropout_probability, training=True)
        vera_A, vera_B = self.sliced(x.device, x.dtype)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, vera_A), vera_B)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(args[0]).to(output.dtype)

    def forward_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Mixed batch: the VeRA term of the chosen rows only, added into them."""
        delta = self.delta(args[0].index_select(0, rows)).to(output.dtype)
        if torch.is_grad_enabled():
            return output.index_add(0, rows, delta)
        return output.index_add_(0, rows, delta)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = (λ_b ⊙ B_l)(λ_d ⊙ A_l), in the layout of the layer's weight."""
        vera_A, vera_B = self.sliced(self.vera_lambda_d.device, torch.float32)
        delta = torch.mm(
            self.vera_lambda_b.detach().float()[:, None] * vera_B, self.vera_lambda_d.detach().float()[:, None] * vera_A
        )
        return {"weight": delta.t() if self.transposed else delta}

    def file_state(self) -> dict[str, torch.Tensor]:
        """λ_b and λ_d; at the first target also A and B, unless `save_projection` is False."""
        state = {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}
        if self.saves_projections:
            state.update({name: getattr(self.projections, name) for name in PROJECTION_NAMES})
        return state

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        current = self.file_state()
        with torch.no_grad():
            for name, tensor in tensors.items():
                current[name].copy_(tensor)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.vera_lambda_d.shape[0]}"


class VeraPeft(PeftCodec):
    """VeRA in peft's files: the config fields under the same names (targets as resolved full module
    names) and, per layer, `vera_lambda_b` / `vera_lambda_d`; the shared pair once, at the top-level
    keys `base_model.vera_A` / `base_model.vera_B` (no module path), when `save_projection` is set."""

    peft_type = "VERA"
    tensor_names = {VeraLinear: {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}}

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, VERA_READ, VERA_TOLERATED, VERA_REFUSED)

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        if tensor_name in PROJECTION_NAMES:
            return f"base_model.{tensor_name}"
        return super().tensor_key(module_name, adapter, tensor_name)

    def tensors_from_peft(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Without `save_projection` peft ignores a saved pair and draws it from the key: so do we."""
        if data.get("save_projection", True):
            return tensors
        return {
            key: tensor for key, tensor in tensors.items() if key.removeprefix("base_model.") not in PROJECTION_NAMES
        }

    def config_to_peft(self, config: VeraConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {
            "r": config.r,
            "target_modules": targets,
            "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection,
            "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": any(not isinstance(model.get_submodule(name), nn.Linear) for name in targets),
            "bias": "none",
            "init_weights": config.init_weights,
        }

    def config_from_peft(self, data: dict[str, Any]) -> VeraConfig:
        return VeraConfig(**vera_fields(data))


def _adapter_types() -> dict[type | str, type[VeraLinear]]:
    from transformers.pytorch_utils import Conv1D

    return {**dict.fromkeys(QUANTIZED_LINEARS, VeraLinear), nn.Linear: VeraLinear, Conv1D: VeraLinear}


@register("vera")
class Vera(ModuleMethod):
    """VeRA on the selected Linear and Conv1D layers, one shared pair of projections per adapter."""

    config_class = VeraConfig
    adapter_types = _adapter_types()
    peft_codec = VeraPeft()
    targets_by_model_type = DEFAULT_TARGETS

    def attach(self, placement: Placement, config: VeraConfig) -> None:
        model = placement.model
        modules = {target: model.get_submodule(target) for target in self.select(model, config)}
        widths = [layer_widths(module) for module in modules.values()]
        first = next(iter(modules.values()))
        projections = VeraProjections(
            config.r,
            max(width[0] for width in widths),
            max(width[1] for width in widths),
            config.projection_prng_key,
            first.weight.device,
        )
        built = {
            target: VeraLinear(module, config, projections, owns=index == 0)
            for index, (target, module) in enumerate(modules.items())
        }
        for target, adapter in built.items():
            placement.put(target, adapter)
