"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685); rsLoRA scaling (Kalajdzievski 2023).

         x ──► W ──────────────┐
         │                     (+) ──► y = W x + b + s · B A dropout(x)
         └─► dropout ─► A ─► B ┘        A: rank × in_features, B: out_features × rank
                                        s = lora_alpha / rank  (rsLoRA: lora_alpha / √rank)

ΔW = s · B A folds into W for merging. A starts Kaiming-uniform and B at zero, so the adapted model
equals the base model until B trains (embeddings: A zero, B normal, as in the paper's code and peft).
Layers: `nn.Linear`, transformers' `Conv1D` (GPT-2; weight stored in × out), `nn.Embedding`,
`nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, grouped too (A is a conv with the layer's kernel, B a 1×1 conv),
bare parameters (`target_parameters`, `lora_parameter`), and the quantized linears of `deltatune.quantized`
(bitsandbytes 4-bit and 8-bit, optimum-quanto): shapes from the logical in/out features, float32 factors,
the base's packed weight never read (torchao's weights are tensor subclasses on a plain `nn.Linear` that
report the logical shape: `LoraLinear` serves them). The settings are in `lora_config.py`, peft's file
format in `lora_peft.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError, UnsupportedModuleError
from ..placement import Placement
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..registry import register
from ..site_adapter import SiteAdapter
from ..targeting import saved_module_names
from .base import ModuleMethod
from .lora_bias import add_bias_terms, bias_deltas, output_bias, trained_biases
from .lora_config import DEFAULT_TARGETS, PLAIN_STARTS, LoraConfig
from .lora_dropout import POSITIONS_LIMIT, DroppedProjection
from .lora_kasa import kasa_loss
from .lora_monteclora import add_monteclora, monteclora_loss
from .lora_peft import LoraPeft
from .lora_velora import add_velora
from .regularizer_hook import LossTerm, RegularizerHook
from .trainable_tokens import token_rows_beside


class LoraAdapter(SiteAdapter):
    """Shared state of every LoRA layer: `lora_A`, `lora_B`, scaling and dropout."""

    delta_reads_module = False
    takes_lora_bias = True

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        module_name: str,
        config: LoraConfig,
        reference: torch.Tensor,
        groups: int = 1,
        parts: int = 1,
    ) -> None:
        """`parts`: rank-r pairs stacked in A's rows (a fused projection's parts, `lora_fused`): A holds
        parts · rank rows, B (with `groups` = parts) rank columns per part."""
        super().__init__()
        self.rank = config.rank_for(module_name)
        self.scaling = config.scaling_for(module_name)
        factory = {
            "dtype": reference.dtype if reference.is_floating_point() else torch.float32,
            "device": reference.device,
        }
        rows = self.rank * parts
        self.lora_A = nn.Parameter(torch.empty((rows, *a_shape), **factory))
        self.lora_B = nn.Parameter(torch.empty((b_shape[0], rows // groups, *b_shape[1:]), **factory))
        self.register_parameter("lora_B_bias", None)  # lora_bias: b_B
        self.register_parameter("trained_bias", None)  # bias other than "none": the layer's trained bias
        self.has_output_bias = False
        self.dropout_probability = config.lora_dropout
        self.velora: nn.Module | None = None  # velora_config: the input's compression for backward (LoraLinear)
        self.monteclora: nn.Module | None = None  # monteclora_config: A's noise in training (LoraLinear)
        self.reset(config.init_lora_weights)

    def reset(self, init: bool | str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def down_projection(self) -> torch.Tensor:
        """The rank × in matrix the input meets first: A (AdaLoRA's SVD form: A with its rows scaled by E)."""
        return self.lora_A

    def up_projection(self) -> torch.Tensor:
        """The out × rank matrix that the rank-r term meets last: B (BD-LoRA: block-diagonal)."""
        return self.lora_B

    def delta_matrix(self) -> torch.Tensor:
        """s · B A as an (out, in · kernel) float32 matrix."""
        down = self.down_projection().detach().float().flatten(1)
        return torch.mm(self.up_projection().detach().float().flatten(1), down).mul_(self.scaling)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def add_low_rank(output: torch.Tensor, hidden: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """output + scaling · hidden Bᵀ as one fused `addmm` over the flattened leading dims. Without
    autograd it writes into `output` (a fresh tensor of the layer's own), saving a copy; with autograd
    it stays out of place, the faster of the two there (bench/README.md, history)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(output.dtype)
    flat_output = output.reshape(-1, output.shape[-1])
    if torch.is_grad_enabled() or not output.is_contiguous():
        return torch.addmm(flat_output, flat_hidden, lora_B.t().to(output.dtype), alpha=scaling).view(output.shape)
    return flat_output.addmm_(flat_hidden, lora_B.t().to(output.dtype), alpha=scaling).view(output.shape)


def _fused_dropout_projection(
    x: torch.Tensor, lora_A: torch.Tensor, probability: float, scaling: float
) -> tuple[torch.Tensor, float]:
    """Accelerators (and large p): torch's fused dropout kernel, one pass over x; a mask made in
    separate passes costs an accelerator more than drawing only the dropped positions saves."""
    return F.linear(F.dropout(x, probability, training=True), lora_A), scaling


def _drawn_positions_projection(
    x: torch.Tensor, lora_A: torch.Tensor, probability: float, scaling: float
) -> tuple[torch.Tensor, float]:
    """CPU: only the dropped positions are drawn and kept (`lora_dropout`), 1/(1-p) folded into the
    scaling; above `POSITIONS_LIMIT` the dense kernel."""
    if probability > POSITIONS_LIMIT:
        return _fused_dropout_projection(x, lora_A, probability, scaling)
    return DroppedProjection.apply(x, lora_A, probability), scaling / (1 - probability)


DROPPED_PROJECTIONS = {"cpu": _drawn_positions_projection}


class LoraLinear(LoraAdapter):
    """LoRA on `nn.Linear` (weight out × in) and GPT-2 `Conv1D` (weight in × out, `transposed`)."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        weight = module.weight
        self.transposed = not isinstance(module, nn.Linear)
        in_features, out_features = weight.shape if self.transposed else weight.shape[::-1]
        super().__init__((in_features,), (out_features,), module_name, config, weight)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(dropout(x) Aᵀ, the scaling that goes with it); dropout (and MonteCLoRA's noise on A) only in training."""
        x = x.to(self.lora_A.dtype)
        down = self.down_projection()
        if self.monteclora is not None and self.training:
            down = self.monteclora.perturbed(down)
        if self.velora is not None and self.training and torch.is_grad_enabled():
            return self.velora(x, down, self.dropout_probability), self.scaling
        if self.training and self.dropout_probability > 0:
            return DROPPED_PROJECTIONS.get(x.device.type, _fused_dropout_projection)(
                x, down, self.dropout_probability, self.scaling
            )
        return F.linear(x, down), self.scaling

    def low_rank_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(hidden, up, scaling) with the LoRA term = scaling · hidden upᵀ: hidden = dropout(x) Aᵀ, up = B."""
        hidden, scaling = self.project(x)
        return hidden, self.up_projection(), scaling

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden, up, scaling = self.low_rank_terms(args[0])
        output = add_low_rank(output, hidden, up, scaling)
        return output + output_bias(self).to(output.dtype) if self.has_output_bias else output

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        delta = self.delta_matrix()
        return {"weight": delta.t() if self.transposed else delta, **bias_deltas(self)}


class LoraQuantizedLinear(LoraLinear):
    """LoRA on a quantized linear (`deltatune.quantized`): A and B from the logical shape, in float32
    (the packed weight is uint8 or int8); the base layer computes its own output, the LoRA term is added
    as on `nn.Linear`. `delta_parameters` gives ΔW as for a plain weight: merging it needs the weight
    dequantized (`DeltaModel.unload(merge=True, dequantize=True)`)."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        row = quantized_linear(module)
        self.transposed = False
        reference = torch.empty(0, dtype=torch.float32, device=module.weight.device)
        LoraAdapter.__init__(
            self, (row.in_features(module),), (row.out_features(module),), module_name, config, reference
        )


class LoraEmbedding(LoraAdapter):
    """LoRA on `nn.Embedding`: the token's column of A (rank × num_embeddings), then B."""

    takes_lora_bias = False  # as in peft

    def __init__(self, module: nn.Embedding, module_name: str, config: LoraConfig) -> None:
        super().__init__((module.num_embeddings,), (module.embedding_dim,), module_name, config, module.weight)

    def reset(self, init: bool | str) -> None:
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def forward(self, module: nn.Embedding, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(
            args[0],
            self.lora_A.t(),
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.scale_grad_by_freq,
            module.sparse,
        )
        return add_low_rank(output, hidden, self.lora_B, self.scaling)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": self.delta_matrix().t()}


CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
"""Spatial dimensions of a convolution → torch's functional convolution of that many."""


class LoraConv(LoraAdapter):
    """LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`: A is an ungrouped conv with the layer's kernel,
    stride, padding and dilation; B a 1×1 conv with the layer's groups (peft's shapes: A rank × in × k,
    B out × rank/groups × 1). Without groups ΔW[o, i, k] = s Σ_r B[o, r] A[r, i, k]; with groups the
    update reaches every input channel while W holds in/groups of them, so it has no ΔW to merge (as in peft)."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, module_name: str, config: LoraConfig) -> None:
        rank = config.rank_for(module_name)
        if rank % module.groups:
            raise UnsupportedModuleError(
                f"LoRA on {module_name} (a convolution with groups={module.groups}) needs a rank divisible by "
                f"{module.groups}, not {rank}: set r (or rank_pattern for this layer) to a multiple of {module.groups}"
            )
        ones = (1,) * len(module.kernel_size)
        super().__init__(
            (module.in_channels, *module.kernel_size),
            (module.out_channels, *ones),
            module_name,
            config,
            module.weight,
            groups=module.groups,
        )
        self.groups = module.groups
        self.dropout = nn.Dropout(config.lora_dropout)
        self.convolution = CONVOLUTIONS[len(module.kernel_size)]

    def project(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A applied to x with the layer's geometry (and padding mode), over all input channels."""
        x = x.to(self.lora_A.dtype)
        padding = module.padding
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        return self.convolution(x, self.lora_A, None, module.stride, padding, module.dilation)

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        output = output + self.scaling * self.low_rank(module, self.dropout(args[0])).to(output.dtype)
        if self.has_output_bias:
            output = output + output_bias(self).to(output.dtype).view(-1, *[1] * (output.dim() - 2))
        return output

    def low_rank(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """B A x, unscaled: the 1×1 grouped conv B over A's output."""
        return self.convolution(self.project(module, x), self.lora_B, groups=self.groups)

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.groups != 1:
            raise MergeError(
                f"LoRA on a grouped convolution (groups={self.groups}) has no weight delta to merge: its update "
                "reads every input channel; keep it unmerged (unload(merge=False)) or leave the layer out"
            )
        return {"weight": self.delta_matrix().view(module.weight.shape), **bias_deltas(self)}


def _adapter_types() -> dict[type | str, type[SiteAdapter]]:
    from transformers.pytorch_utils import Conv1D

    from .lora_mha import LoraMultiheadAttention  # it builds on this module's classes

    return {
        **dict.fromkeys(QUANTIZED_LINEARS, LoraQuantizedLinear),
        nn.Linear: LoraLinear,
        Conv1D: LoraLinear,
        nn.Embedding: LoraEmbedding,
        nn.Conv1d: LoraConv,
        nn.Conv2d: LoraConv,
        nn.Conv3d: LoraConv,
        nn.MultiheadAttention: LoraMultiheadAttention,
    }


REGULARIZERS: dict[str, LossTerm] = {"kasa_config": kasa_loss, "monteclora_config": monteclora_loss}
"""LoRA variants whose paper trains with a term added to the task loss: the config field that turns the
variant on → the term, which `deltatune train` adds (peft leaves both to the user's loop)."""


@register("lora")
class Lora(ModuleMethod):
    """LoRA on the selected Linear, Conv1D, Embedding and Conv layers."""

    config_class = LoraConfig
    adapter_types = _adapter_types()
    peft_codec = LoraPeft()
    targets_by_model_type = DEFAULT_TARGETS

    def build_adapter(self, module: nn.Module, module_name: str, config: LoraConfig) -> nn.Module:
        if config.kasa_config is not None:  # its other options are refused (check_kasa_options)
            from .lora_kasa_layer import build_kasa  # it builds on this module's classes

            adapter = build_kasa(module, module_name, config)
        elif isinstance(config.init_lora_weights, str) and config.init_lora_weights not in PLAIN_STARTS:
            from .lora_init import build_initialised  # lora_init builds on this module's classes (and refuses DoRA)

            adapter = build_initialised(module, module_name, config)
        elif config.use_dora:  # its bias terms are refused (check_bias_options)
            from .dora import build_dora  # dora builds on this module's classes

            return build_dora(module, module_name, config)
        elif config.slices_for(module_name) is not None:  # its other layer forms are refused (check_slice_options)
            from .lora_fused import build_fused_slices  # it builds on this module's classes

            return build_fused_slices(module, module_name, config)
        elif config.use_gating:  # its other layer forms are refused (check_gating_options)
            from .lora_gating import build_gated  # it builds on this module's classes

            return build_gated(module, module_name, config)
        elif config.use_bdlora is not None:
            from .lora_block_diagonal_layers import build_block_diagonal  # it builds on this module's classes

            adapter = build_block_diagonal(module, module_name, config)
        else:
            adapter = super().build_adapter(module, module_name, config)
        add_velora(adapter, module, module_name, config)
        add_monteclora(adapter, module, module_name, config)
        add_bias_terms(adapter, module, module_name, config)
        return adapter

    def training_hook(self, delta_model: Any, name: str, total_steps: int) -> RegularizerHook | None:
        """`deltatune train` adds the loss terms of the adapter's variants (`REGULARIZERS`); other LoRA
        adapters need no hook."""
        config = delta_model.configs[name]
        terms = [REGULARIZERS[field] for field in self.trainer_loss_terms(config)]
        return RegularizerHook(delta_model, name, terms) if terms else None

    def trainer_loss_terms(self, config: LoraConfig) -> list[str]:
        """The `REGULARIZERS` fields the adapter turns on: the terms `deltatune train` adds (run identity)."""
        return [field for field in REGULARIZERS if getattr(config, field) is not None]

    def attach(self, placement: Placement, config: LoraConfig) -> None:
        """LoRA's layers: the selected modules and the selected parameters (`target_parameters`: one adapter
        per module that holds them), then the token rows of `trainable_token_indices` and the biases of
        `bias="all"`."""
        model = placement.model
        modules = self.select(model, config) if config.target_modules or not config.target_parameters else []
        built = {name: self.build_adapter(model.get_submodule(name), name, config) for name in modules}
        saved = saved_module_names(model, config)
        tokens = token_rows_beside(model, config.trainable_token_indices, set(built), saved)
        biases = trained_biases(model, config, set(built) | set(tokens), saved)
        for name, adapter in built.items():
            placement.put(name, adapter)
        if config.target_parameters:
            from .lora_parameter import attach_parameters  # it builds on this module's classes

            attach_parameters(placement, config)
        for name, adapter in {**tokens, **biases}.items():
            placement.put(name, adapter, target=False)
