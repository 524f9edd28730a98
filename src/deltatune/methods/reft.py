"""ReFT: representation fine-tuning by low-rank interventions on the residual stream (Wu et al. 2024,
arXiv:2404.03592), as AdapterHub 1.3 implements it (`LoReftConfig`, `NoReftConfig`, `DiReftConfig`).

After every chosen block (each layer's output, the residual stream), the hidden state h ∈ R^d at chosen
positions is replaced by

    Φ(h) = dropout(h + Rᵀ (f(W h + b) − R h))          R, W ∈ R^{r×d}, b ∈ R^r, f: `non_linearity`

    LoReFT   R with orthonormal rows (`orthogonality`), f = identity: the paper's h + Rᵀ(W h + b − R h)
    NoReFT   R unconstrained
    DiReFT   R unconstrained, no −R h term (`subtract_projection=False`): h + Rᵀ f(W h + b)

The positions are the first `prefix_positions` and the last `suffix_positions` real tokens of each row
(`reft_positions`: read from the attention mask at the model's stack, so left and right padding both
work); the prefix has its own (R, W, b), the suffix another, unless `tied_weights`. Where the two overlap
(a row shorter than both) the suffix's value wins, as in AdapterHub. The dropout acts on the whole new
state Φ(h), as in AdapterHub and pyreft.

The orthogonal R is torch's `parametrizations.orthogonal` of a wide r × d matrix (Householder map with
the dynamic trivialization, the layout AdapterHub saves): Rᵀ = B · H(V) · diag(s), where V (d × r) holds
Householder reflectors in its strict lower triangle (the trained parameter, `original`ᵀ), B (d × d) is
an orthogonal base fixed at init and s ∈ {±1}^r the signs torch reads off V's diagonal. The signs are kept
as a buffer here, so that weight decay or a random draw on `original` never zeroes R (torch truncates
the diagonal to an integer).

Not mergeable: Φ acts on activations at chosen positions, not on weights. Mixed batches run each row's
adapter on its own rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from ..architectures import block_names
from ..config import DeltaConfig
from ..errors import DeltaTuneError, MergeError
from ..field_check import DropoutRate, NonNegativeInt, PositiveInt
from ..placement import Placement
from ..registry import register
from ..site_adapter import SiteAdapter
from .bottleneck import activation, weight_reference
from .reft_positions import PositionTap, StackPositions, stack_of_block, stacks


@dataclasses.dataclass
class ReftConfig(DeltaConfig):
    """ReFT settings, with AdapterHub's field names; the defaults are LoReFT's."""

    layers: Literal["all"] | list[NonNegativeInt] = "all"
    """The blocks (0-based, in model order; T5's decoder after its encoder) that get an intervention."""
    prefix_positions: NonNegativeInt = 3
    """How many of each row's first real tokens are intervened on."""
    suffix_positions: NonNegativeInt = 0
    """How many of each row's last real tokens are intervened on."""
    r: PositiveInt = 1
    """The rank of the intervention: rows of R and W."""
    orthogonality: bool = True
    """R has orthonormal rows (LoReFT); False: R is a plain matrix (NoReFT, DiReFT)."""
    tied_weights: bool = False
    """One (R, W, b) for prefix and suffix positions alike; False: one each."""
    subtract_projection: bool = True
    """Subtract R h inside the intervention (LoReFT, NoReFT); False: DiReFT's h + Rᵀ f(W h + b)."""
    dropout: DropoutRate = 0.05
    """Dropout on the new state Φ(h) at the intervened positions."""
    non_linearity: str | None = None
    """f on W h + b: None (identity) or an activation name ("relu", "gelu", "leakyrelu", ...)."""
    init_weights_seed: int | None = None
    """A seed drawn again for every intervention, so all start with the same weights; None: one draw."""

    def normalise(self) -> None:
        if self.layers != "all":
            self.layers = sorted(set(self.layers))
        super().normalise()

    def validate(self) -> None:
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise DeltaTuneError("set prefix_positions or suffix_positions above 0: the config intervenes nowhere")
        if self.non_linearity is not None:
            activation(self.non_linearity)


@dataclasses.dataclass
class LoReftConfig(ReftConfig):
    """LoReFT: h + Rᵀ(W h + b − R h), R with orthonormal rows (the defaults of `ReftConfig`)."""


@dataclasses.dataclass
class NoReftConfig(ReftConfig):
    """NoReFT: LoReFT without the orthogonality of R."""

    orthogonality: bool = False


@dataclasses.dataclass
class DiReftConfig(ReftConfig):
    """DiReFT: h + Rᵀ(W h + b), R unconstrained, no subtracted projection."""

    orthogonality: bool = False
    subtract_projection: bool = False


def householder_rows(original: torch.Tensor, signs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R (r × d) = (B · H(V) · diag(s))ᵀ with V = `original`ᵀ: torch's orthogonal parametrization of a wide
    matrix (Householder map, trivialization), with s given instead of read off V's diagonal. In float32."""
    reflectors = original.float().mT.tril(-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    columns = torch.linalg.householder_product(reflectors, tau) * signs.float()
    return (base.float() @ columns).mT


def orthonormal_completion(columns: torch.Tensor) -> torch.Tensor:
    """A d × d orthogonal matrix whose first k columns span `columns` (d × k), as torch's right inverse
    builds its base: random columns appended, then Q of a QR with R's diagonal made positive."""
    filled = torch.cat([columns, torch.randn(columns.shape[0], columns.shape[0] - columns.shape[1])], dim=1)
    q, r = torch.linalg.qr(filled.double())
    return (q * torch.sign(r.diagonal()).unsqueeze(0)).to(columns.dtype)


class OrthogonalProjection(nn.Module):
    """R with orthonormal rows, `weight` = `householder_rows(original, signs, base)`. At init R is the
    orthonormalised Kaiming-uniform draw of an `nn.Linear(d, r)` (torch's and AdapterHub's start)."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        start = torch.empty(rank, hidden)
        nn.init.kaiming_uniform_(start, a=math.sqrt(5))
        self.original = nn.Parameter(-torch.eye(rank, hidden))
        """V (transposed): the reflectors below the diagonal train; at −I, H(V)·diag(s) = I."""
        self.register_buffer("signs", -torch.ones(rank))
        self.register_buffer("base", orthonormal_completion(start.mT))

    @property
    def weight(self) -> torch.Tensor:
        return householder_rows(self.original, self.signs, self.base)


class ReftUnit(nn.Module):
    """One intervention Φ: `learned_source` (W, b), `projection` (R), f and the dropout."""

    def __init__(self, hidden: int, config: ReftConfig) -> None:
        super().__init__()
        self.learned_source = nn.Linear(hidden, config.r)
        self.projection = (
            OrthogonalProjection(hidden, config.r) if config.orthogonality else nn.Linear(hidden, config.r, bias=False)
        )
        self.activation = nn.Identity() if config.non_linearity is None else activation(config.non_linearity)
        self.subtract_projection = config.subtract_projection
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Φ(h) for h of shape (..., d), in the unit's dtype."""
        rows = self.projection.weight.to(self.learned_source.weight.dtype)
        source = self.activation(self.learned_source(hidden))
        if self.subtract_projection:
            source = source - hidden @ rows.mT
        return self.dropout(hidden + source @ rows)


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a block's output: the output itself or its first element."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_first(output: Any, hidden: torch.Tensor) -> Any:
    """The block's output with its hidden states replaced."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    raise DeltaTuneError(f"ReFT cannot read a block output of type {type(output).__name__}; expected a tensor or tuple")


class ReftIntervention(SiteAdapter):
    """The interventions of one adapter at one block's output: `units[0]` on the prefix positions,
    `units[1]` on the suffix ones (one unit for both when tied)."""

    def __init__(self, units: nn.ModuleList, config: ReftConfig, positions: StackPositions) -> None:
        super().__init__()
        self.units = units
        self.prefix_positions = config.prefix_positions
        self.suffix_positions = config.suffix_positions
        self.tied_weights = config.tied_weights
        self.__dict__["positions"] = positions  # shared with the stack's tap: not a submodule

    def extra_repr(self) -> str:
        return f"prefix={self.prefix_positions}, suffix={self.suffix_positions}, tied={self.tied_weights}"

    def intervene(self, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """h with Φ applied at this call's chosen positions (of the batch rows `rows`, or all): only those
        positions are gathered and run through their unit; h + (Φ(g) − g) is added back."""
        prefix, suffix = self.positions.chosen(self.prefix_positions, self.suffix_positions, hidden, rows)
        dtype = self.units[0].learned_source.weight.dtype
        changed = hidden
        for unit, picked in ((self.units[0], prefix), (self.units[-1], suffix)):
            if picked.index.shape[1] == 0:
                continue
            index = picked.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            states = hidden.gather(1, index).to(dtype)
            delta = (unit(states) - states) * picked.valid.unsqueeze(-1)
            changed = changed.scatter_add(1, index, delta.to(hidden.dtype))
        return changed

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return with_first(output, self.intervene(first_tensor(output), None))

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        hidden = first_tensor(output)
        return with_first(output, hidden.index_copy(0, rows, self.intervene(hidden.index_select(0, rows), rows)))

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        raise MergeError(
            "ReFT (reft) cannot be merged into the weights: it edits hidden states at chosen positions, which no "
            "weight change reproduces; keep it as an adapter, or use unload(merge=False)"
        )


@register("reft")
class Reft:
    """ReFT interventions after the chosen blocks, with a position tap at each stack that holds them."""

    config_class = ReftConfig

    def attach(self, placement: Placement, config: ReftConfig) -> None:
        model = placement.model
        stack_names = stacks(model)
        blocks = block_names(model)
        chosen = range(len(blocks)) if config.layers == "all" else config.layers
        missing = [layer for layer in chosen if layer >= len(blocks)]
        if missing:
            raise DeltaTuneError(f"layers {missing} do not exist: the model has {len(blocks)} blocks (0-based)")
        hidden = _hidden_size(model)
        if config.r > hidden:
            raise DeltaTuneError(f"r={config.r} exceeds the hidden size {hidden}; pick r ≤ {hidden}")
        taps = {stack: StackPositions(stack, model.get_submodule(stack)) for stack in stack_names}
        reference = weight_reference(model.get_submodule(blocks[0]))
        for stack, positions in taps.items():
            placement.put(stack, PositionTap(positions), target=False)
        for layer in chosen:
            units = nn.ModuleList(_unit(hidden, config) for _ in range(1 if config.tied_weights else 2))
            units.to(device=reference.device, dtype=reference.dtype)
            positions = taps[stack_of_block(blocks[layer], taps)]
            placement.put(blocks[layer], ReftIntervention(units, config, positions), layer=layer)


def _unit(hidden: int, config: ReftConfig) -> ReftUnit:
    """A unit drawn from the global generator, or from `init_weights_seed` (then every unit is the same)."""
    if config.init_weights_seed is None:
        return ReftUnit(hidden, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_weights_seed)
        return ReftUnit(hidden, config)


def _hidden_size(model: nn.Module) -> int:
    model_config = getattr(model, "config", None)
    size = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
    if size is None:
        raise DeltaTuneError(f"{type(model).__name__} has no config.hidden_size; ReFT needs a transformers model")
    return size
