"""OFT: orthogonal fine-tuning (Qiu et al. 2023, arXiv:2306.07280), in peft 0.21's block-diagonal form.

A frozen layer keeps its weight W and sees its input rotated by a learned block-diagonal orthogonal R:

    y = W (Rᵀ x) + b         R = diag(R_1, …, R_k)  (n × n, n = in_features = k · oft_block_size)

(as rows: x ↦ x R, then the layer), each R_i a Cayley transform of a skew-symmetric matrix
(`oft_rotation`): (k, b(b−1)/2) parameters `oft_R`, zero at init, so R = I and the model starts as the
base. Rotating the input preserves the angles between the rows of W (the paper's hyperspherical energy).
R acts block by block (O(n·b) per token), computed per call in training and kept in eval mode until its
parameters change (generation computes it once, peft per token); the n × n matrix is built only to merge:

    Linear (out × in):  W' = W Rᵀ          GPT-2 Conv1D (in × out): W' = R W
    Conv2d 1×1:         W' = W Rᵀ on the (out, in) filter matrix
    Embedding:          the output rotates, y = E[token] R, so E' = E R (peft's OFT embedding)

ΔW = W' − W reads the module's weight, so merge keeps the ΔW it added and unmerge subtracts exactly that.
Two OFT adapters active at one module rotate in activation order (x R_a R_b), as in peft; merging them
composes in merge order (W R_aᵀ R_bᵀ), as peft's merge does: merge several rotations one at a time only
in the reverse of the order they ran. `block_share`: one R_0 for every block. `coft`: R stays within ε of
I (the parameter is projected before each use, as in peft). Convolutions: 1×1 kernels only: peft 0.21
rotates overlapping k×k patches and folds them back summed, which is neither the base at init nor its own
merge for k > 1, so there is no rotation of the weights to match there. peft has no OFT on Conv1D, so
such an adapter saves only in deltatune's format. On quantized linears R acts on the input as on
`nn.Linear` and the packed weight is never read; merging needs `unload(merge=True, dequantize=True)`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ..config import TargetedConfig
from ..errors import DeltaTuneError, MergeError, UnsupportedModuleError
from ..field_check import DropoutRate, NonNegativeInt, PositiveFloat, PositiveInt
from ..peft_format import PeftCodec
from ..peft_keys import OFT_READ, check_oft_keys
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..registry import register
from ..site import CallNote, RoutingState
from ..site_adapter import SiteAdapter
from .base import ModuleMethod
from .lora import DEFAULT_TARGETS
from .oft_rotation import block_diagonal, cayley, constrained, rotate_features, skew_symmetric


@dataclasses.dataclass
class OFTConfig(TargetedConfig):
    """OFT settings; names and defaults follow peft 0.21's `OFTConfig`. Set exactly one of `r` and
    `oft_block_size` (the other 0): r · oft_block_size = the layer's in_features."""

    r: NonNegativeInt = 0
    """Number of blocks per layer (0: from `oft_block_size`)."""
    oft_block_size: NonNegativeInt = 32
    """Size b of each block (0: from `r`). A size that does not divide a layer's in_features is moved to
    the nearest one that does, with a warning, as peft does (so peft's shapes load)."""
    module_dropout: DropoutRate = 0.0
    """Must stay 0: peft 0.21 builds this multiplicative dropout but never applies it, and deltatune does
    not implement it either (a peft folder that sets it loads, with the outputs peft gives)."""
    init_weights: bool = True
    """True: zero parameters, R = I (the model starts as the base); False: normal(0, 0.1) (for tests)."""
    coft: bool = False
    """Constrained OFT: keep each block's skew matrix within Frobenius norm eps/√k of zero."""
    eps: PositiveFloat = 6e-5
    """COFT's radius (only read with `coft`)."""
    block_share: bool = False
    """One rotation block shared by all the blocks of a layer (b(b−1)/2 parameters per layer)."""
    use_cayley_neumann: bool = True
    """R from a truncated Neumann series instead of an exact solve: faster, orthogonal only to
    O(‖Q‖^n) (peft's default)."""
    num_cayley_neumann_terms: PositiveInt = 5
    """Terms n of the series (`oft_rotation`)."""

    def validate(self) -> None:
        super().validate()
        if (self.r == 0) == (self.oft_block_size == 0):
            raise DeltaTuneError(
                f"OFTConfig needs exactly one of r and oft_block_size set (the other 0), got r={self.r} and "
                f"oft_block_size={self.oft_block_size}: r blocks of oft_block_size make a layer's in_features"
            )
        if self.module_dropout != 0:
            raise DeltaTuneError(
                f"module_dropout={self.module_dropout} is not implemented (peft 0.21 never applies it either); "
                "set module_dropout=0"
            )


def nearest_divisor(features: int, wanted: int) -> int:
    """peft's adjustment of a block size (or count) that does not divide `features`: the nearest divisor,
    the lower one on a tie; `features` itself when `wanted` is larger."""
    if wanted >= features:
        return features
    higher = wanted
    while higher <= features and features % higher:
        higher += 1
    lower = wanted
    while lower > 1 and features % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(features: int, config: OFTConfig, module_name: str) -> tuple[int, int]:
    """(blocks k, block size b) for a layer with `features` inputs, adjusted as peft adjusts them."""
    field, wanted = ("oft_block_size", config.oft_block_size) if config.r == 0 else ("r", config.r)
    value = wanted if features % wanted == 0 and wanted <= features else nearest_divisor(features, wanted)
    if value != wanted:
        warnings.warn(
            f"OFT at {module_name}: {field}={wanted} does not divide its {features} features; using {value}",
            UserWarning,
            stacklevel=6,
        )
    return (features // value, value) if field == "oft_block_size" else (value, features // value)


class OftAdapter(SiteAdapter):
    """The rotation of one layer: `oft_R` (k, b(b−1)/2) packed skew blocks (one block with `block_share`)."""

    def __init__(self, features: int, module_name: str, config: OFTConfig, reference: torch.Tensor) -> None:
        super().__init__()
        self.features = features
        self.block_count, self.block_size = block_layout(features, config, module_name)
        self.use_neumann = config.use_cayley_neumann
        self.terms = config.num_cayley_neumann_terms
        self.coft_eps = config.eps if config.coft else None
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        stored = 1 if config.block_share else self.block_count
        size = self.block_size * (self.block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(stored, size, dtype=dtype, device=reference.device))
        rows, columns = torch.triu_indices(self.block_size, self.block_size, 1, device=reference.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("columns", columns, persistent=False)
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        self.kept_blocks: tuple[tuple, torch.Tensor] | None = None
        """(the version of `oft_R` they come from, R's blocks), kept in eval mode (`blocks`)."""

    def extra_repr(self) -> str:
        return f"blocks={self.block_count}, block_size={self.block_size}, shared={self.oft_R.shape[0] == 1}"

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks R_i, (k, b, b) (k = 1 shared). In eval mode without a graph to record they
        are kept until `oft_R` changes (its storage or version counter: a write through `.data` bypasses it,
        so call `train()` or write the parameter itself), so generation computes R once, not per token."""
        if self.training or (torch.is_grad_enabled() and self.oft_R.requires_grad):
            return self.computed_blocks()
        kept = self.kept_blocks
        if kept is None or kept[0] != self.parameter_version():
            blocks = self.computed_blocks()
            self.kept_blocks = kept = (self.parameter_version(), blocks)
        return kept[1]

    def parameter_version(self) -> tuple:
        """What the kept blocks depend on; inference mode too (its tensors cannot serve autograd outside it)."""
        parameter = self.oft_R
        return (parameter.data_ptr(), parameter._version, parameter.dtype, torch.is_inference_mode_enabled())

    def train(self, mode: bool = True) -> OftAdapter:
        """Training drops the kept blocks; `eval()` keeps them (a loop may call it before every forward)."""
        if mode:
            self.kept_blocks = None
        return super().train(mode)

    def computed_blocks(self) -> torch.Tensor:
        """R from `oft_R` (COFT first projects `oft_R` in place; a second projection would change nothing)."""
        if self.coft_eps is not None:
            with torch.no_grad():
                self.oft_R.copy_(constrained(self.oft_R, self.block_size, self.coft_eps))
        skew = skew_symmetric(self.oft_R, self.rows, self.columns, self.block_size)
        return cayley(skew, self.use_neumann, self.terms)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x R along the last axis, computed in the parameters' dtype, returned in x's."""
        return rotate_features(x.to(self.oft_R.dtype), self.blocks(), self.features).to(x.dtype)

    def rotation_matrix(self) -> torch.Tensor:
        """The dense float32 R (n × n)."""
        return block_diagonal(self.blocks().detach().float(), self.features)

    def rotated_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """The merged weight for this layer's `weight` (float32) and R."""
        raise NotImplementedError

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = W' − W in float32; refused on quantized weights (torchao's too), which it would have to read."""
        if quantized_linear(module) is not None:
            raise MergeError(
                "an OFT adapter cannot merge into quantized weights; use unload(merge=True, dequantize=True) for "
                "dequantized float32 Linears with the adapter merged, or keep the adapter unmerged"
            )
        weight = module.weight.detach().float()
        return {"weight": self.rotated_weight(weight, self.rotation_matrix()) - weight}


class OftInput(OftAdapter):
    """OFT on a layer whose input rotates (`axis`: the feature axis of the input): the rotation happens
    before the layer runs (`prepare`), so the layer's output needs nothing more."""

    axis = -1

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == -1:
            return self.rotate(x)
        return self.rotate(x.movedim(self.axis, -1)).movedim(-1, self.axis)

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict, note: CallNote) -> tuple[tuple, dict]:
        return (self.rotate_input(args[0]), *args[1:]), kwargs

    def prepare_rows(
        self, module: nn.Module, args: tuple, kwargs: dict, groups: list, state: RoutingState, note: CallNote
    ) -> tuple[tuple, dict]:
        """Mixed batch: each OFT adapter's rows of the input rotate by its R; the other rows stay (a copy
        of the input is made: the caller's tensor is never written)."""
        x = args[0]
        for adapter, name, rows in groups:
            if not isinstance(adapter, OftInput):
                raise DeltaTuneError(
                    f"adapter {name!r} ({type(adapter).__name__}) rewrites the same layer's input as an OFT adapter, "
                    "which mixed batches do not combine; run these adapters in separate batches"
                )
            expanded = state.expanded_rows(name, rows, x.shape[0], x.device)
            x = x.index_copy(0, expanded, adapter.rotate_input(x.index_select(0, expanded)).to(x.dtype))
        return (x, *args[1:]), kwargs

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def forward_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        return output


class OftLinear(OftInput):
    """OFT on `nn.Linear` (weight out × in): W' = W Rᵀ."""

    def __init__(self, module: nn.Module, module_name: str, config: OFTConfig) -> None:
        super().__init__(module.in_features, module_name, config, module.weight)

    def rotated_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        return weight @ rotation.t()


class OftConv1D(OftInput):
    """OFT on transformers' GPT-2 `Conv1D` (weight in × out): W' = R W. peft has no such layer."""

    def __init__(self, module: nn.Module, module_name: str, config: OFTConfig) -> None:
        super().__init__(module.weight.shape[0], module_name, config, module.weight)

    def rotated_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        return rotation @ weight


class OftQuantizedLinear(OftLinear):
    """OFT on a quantized linear (`deltatune.quantized`): in_features from its logical shape, float32
    parameters; the packed weight is never read. Merging reads the dequantized weight
    (`unload(merge=True, dequantize=True)` hands this adapter a plain Linear)."""

    def __init__(self, module: nn.Module, module_name: str, config: OFTConfig) -> None:
        reference = torch.empty(0, dtype=torch.float32, device=module.weight.device)
        OftInput.__init__(self, quantized_linear(module).in_features(module), module_name, config, reference)


class OftConv2d(OftInput):
    """OFT on a 1×1 `nn.Conv2d`: the input channels rotate; W' = W Rᵀ on the (out, in) filter matrix."""

    axis = 1

    def __init__(self, module: nn.Conv2d, module_name: str, config: OFTConfig) -> None:
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            raise UnsupportedModuleError(
                f"OFT supports 1×1 convolutions without groups; {module_name} has kernel {tuple(module.kernel_size)} "
                f"and groups={module.groups} (peft 0.21's OFT on larger kernels is neither the base at init nor "
                "its own merge); leave it out of target_modules"
            )
        super().__init__(module.in_channels, module_name, config, module.weight)

    def rotated_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        return (weight.flatten(1) @ rotation.t()).view(weight.shape)


class OftEmbedding(OftAdapter):
    """OFT on `nn.Embedding`: the looked-up vectors rotate, y = E[token] R; E' = E R."""

    def __init__(self, module: nn.Embedding, module_name: str, config: OFTConfig) -> None:
        super().__init__(module.embedding_dim, module_name, config, module.weight)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return self.rotate(output)

    def rotated_weight(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        return weight @ rotation


RESOLVED_IN_TARGETS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
"""Fields a peft folder gets as the resolved full names of the targets (`modules_to_save`: peft's general rule)."""


class OftPeft(PeftCodec):
    """OFT in peft's files: the config fields under the same names, the targets as full module names,
    and one tensor per layer, `oft_R.weight` (embeddings: `oft_embedding_R.weight`)."""

    peft_type = "OFT"
    tensor_names = {
        OftInput: {"oft_R": "oft_R.weight"},
        OftEmbedding: {"oft_R": "oft_embedding_R.weight"},
    }

    def check_keys(self, data: dict[str, Any]) -> None:
        check_oft_keys(data)

    def config_to_peft(self, config: OFTConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        unreadable = [name for name in targets if isinstance(model.get_submodule(name), Conv1D)]
        if unreadable:
            raise DeltaTuneError(
                f"peft 0.21 has no OFT on GPT-2's Conv1D layers ({unreadable[0]}), so it could not load this "
                "adapter; save it with format='deltatune'"
            )
        return {
            **{key: getattr(config, key) for key in OFT_READ if key not in RESOLVED_IN_TARGETS},
            "target_modules": targets,
            "fan_in_fan_out": False,
            "bias": "none",
        }

    def config_from_peft(self, data: dict[str, Any]) -> OFTConfig:
        return OFTConfig(**{key: data[key] for key in OFT_READ if data.get(key) is not None})


def _adapter_types() -> dict[type | str, type[OftAdapter]]:
    from transformers.pytorch_utils import Conv1D

    return {
        **dict.fromkeys(QUANTIZED_LINEARS, OftQuantizedLinear),
        nn.Linear: OftLinear,
        Conv1D: OftConv1D,
        nn.Conv2d: OftConv2d,
        nn.Embedding: OftEmbedding,
    }


@register("oft")
class Oft(ModuleMethod):
    """OFT on the selected Linear, Conv1D, quantized linear, 1×1 Conv2d and Embedding layers."""

    config_class = OFTConfig
    adapter_types = _adapter_types()
    peft_codec = OftPeft()
    targets_by_model_type = DEFAULT_TARGETS
