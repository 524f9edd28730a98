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
report the logical shape: `LoraLinear` serves them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetedConfig
from ..errors import MergeError, UnsupportedModuleError
from ..field_check import DropoutRate, FullMatch, NonNegativeInt, PositiveInt, Regex, accepts, field_types
from ..peft_format import BASE_LAYER, PeftCodec
from ..peft_keys import LORA_READ, check_init_writable, check_lora_keys
from ..placement import Placement
from ..quantized import QUANTIZED_LINEARS, quantized_linear
from ..registry import register
from ..site import SiteAdapter
from ..targeting import pattern_value, saved_module_names
from .base import ModuleMethod, lookup_type
from .lora_bias import TrainedBias, add_bias_terms, bias_deltas, check_bias_options, output_bias, trained_biases
from .lora_block_diagonal import BdLoraConfig, check_block_diagonal_options
from .lora_corda import CordaConfig
from .lora_dropout import POSITIONS_LIMIT, DroppedProjection
from .lora_eva import EvaConfig, eva_config_for_peft
from .lora_kasa import KasaConfig, check_kasa_options
from .lora_velora import VeloraConfig, add_velora, check_velora_options, velora_config_for_peft
from .token_rows import TokenRows
from .trainable_tokens import check_token_indices, token_rows_beside

DEFAULT_TARGETS = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "bart", "phi", "mbart"], ["q_proj", "v_proj"]
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "deberta-v2"], ["query", "value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
    "gpt2": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
}

PissaIterations = Annotated[str, FullMatch(r"pissa_niter_\d+", '"pissa_niter_<iterations>"')]

PLAIN_STARTS = ("gaussian", "eva", "loftq")
"""String inits whose adapter is built as plain LoRA's (EVA and LoftQ set its factors afterwards)."""


@dataclasses.dataclass
class LoraConfig(TargetedConfig):
    """LoRA settings; names and defaults follow peft's `LoraConfig`."""

    r: PositiveInt = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Scale numerator: s = lora_alpha / r (or / √r with `use_rslora`)."""
    lora_dropout: DropoutRate = 0.0
    """Dropout on the LoRA input path, an independent mask per adapted module. 0 costs nothing; small
    p costs little on CPU (only the dropped positions are drawn, see `lora_dropout`)."""
    use_rslora: bool = False
    """Scale by lora_alpha / √r, which keeps learning stable at high ranks."""
    init_lora_weights: (
        bool | Literal["gaussian", "orthogonal", "pissa", "olora", "eva", "corda", "loftq", "mica"] | PissaIterations
    ) = True
    """True: B = 0 (the model starts equal to the base); "gaussian": A ~ N(0, 1/r), B = 0;
    False: random A and B (for tests: the adapter changes the output from the start). From the layer's
    weight (Linear; Conv1D but for OLoRA), `methods/lora_init.py`: "pissa" (the top-r singular part of W),
    "pissa_niter_<K>" (the same by a randomized SVD), "olora" (W's QR), each with its initial term taken
    out again so the model starts at the base; "orthogonal" (B A = 0, neither zero); "mica" (B frozen at W's
    r minor left singular vectors, A = 0 and trained: `methods/lora_mica.py`; Embedding too). From data
    (`deltatune.initialize_from_data`, run by `deltatune train` on its first batches): "eva" (A from the
    inputs' principal directions), "corda" (W's decomposition by the inputs' covariance). On a quantized
    base, "loftq": the rank-r fit of the quantization error (`deltatune.replace_lora_weights_loftq`, run
    by `deltatune train` with `quantize`; peft's "loftq" would re-quantize the base instead)."""
    rank_pattern: dict[Regex, PositiveInt] = dataclasses.field(default_factory=dict)
    """{module name pattern: rank} overriding `r` for matching modules (peft's matching rule)."""
    alpha_pattern: dict[Regex, float] = dataclasses.field(default_factory=dict)
    """{module name pattern: alpha} overriding `lora_alpha` for matching modules."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly (`methods/lora_parameter.py`), peft's rule: a full parameter name or
    its ending (`"mlp.experts.gate_up_proj"`); 2-D and 3-D (fused experts) parameters. With no
    `target_modules`, only these are adapted."""
    eva_config: EvaConfig | dict[str, Any] | None = None
    """EVA's settings (`methods/lora_eva.py`), with init_lora_weights="eva"; a mapping is read as one."""
    corda_config: CordaConfig | dict[str, Any] | None = None
    """CorDA's settings (`methods/lora_corda.py`), with init_lora_weights="corda"; a mapping is read as one."""
    use_bdlora: BdLoraConfig | dict[str, Any] | None = None
    """BD-LoRA (`methods/lora_block_diagonal.py`): a block-diagonal A or B on the Linear layers its
    patterns name; a mapping is read as a `BdLoraConfig`."""
    kasa_config: KasaConfig | dict[str, Any] | None = None
    """KaSA (`methods/lora_kasa.py`; nn.Linear): W's r smallest singular components dropped, a trained
    diagonal between A and B: y = (W − D) x + s·B diag(ΔΣ) A x; its β, γ weigh `deltatune.kasa_loss`."""
    use_dora: bool = False
    """DoRA (`methods/dora.py`): W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ per output row, with a trained
    magnitude m per output feature; on Linear, Conv1D, Embedding and Conv layers."""
    lora_bias: bool = False
    """B gets a trained bias b_B, scaled with B: y = W x + b + s·(B A x + b_B) (`methods/lora_bias.py`)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which of the base model's biases train as well: none, those of the LoRA layers, or all (every
    module with a bias), each as a delta merged on `merge()`; files store the trained bias, as peft's."""
    trainable_token_indices: list[NonNegativeInt] | dict[str, list[NonNegativeInt]] | None = None
    """Token rows of embeddings that train too (`methods/trainable_tokens.py`): ids in the input
    embedding, or {embedding name (suffix): ids}; only those rows are saved. A head tied to the input
    embedding uses the trained rows."""
    velora_config: VeloraConfig | dict[str, Any] | None = None
    """VeLoRA (`methods/lora_velora.py`): in training, A's gradient from a rank-1 projection of sub-tokens of
    its input, which is all the backward pass keeps of it (linear layers); a mapping is read as one."""

    def validate(self) -> None:
        super().validate()
        check_bias_options(self)
        check_block_diagonal_options(self)
        check_kasa_options(self)
        check_velora_options(self)
        indices = self.trainable_token_indices
        if isinstance(indices, dict):
            for name, listed in indices.items():
                check_token_indices(listed, f"trainable_token_indices[{name!r}]")
        elif indices is not None:
            check_token_indices(indices, "trainable_token_indices")

    def normalise(self) -> None:
        super().normalise()
        if isinstance(self.eva_config, dict):
            self.eva_config = EvaConfig.from_dict(self.eva_config)
        if isinstance(self.corda_config, dict):
            self.corda_config = CordaConfig.from_dict(self.corda_config)
        if isinstance(self.use_bdlora, dict):
            self.use_bdlora = BdLoraConfig.from_dict(self.use_bdlora)
        if isinstance(self.kasa_config, dict):
            self.kasa_config = KasaConfig.from_dict(self.kasa_config)
        if isinstance(self.velora_config, dict):
            self.velora_config = VeloraConfig.from_dict(self.velora_config)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


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
    ) -> None:
        super().__init__()
        self.rank = config.rank_for(module_name)
        self.scaling = config.scaling_for(module_name)
        factory = {
            "dtype": reference.dtype if reference.is_floating_point() else torch.float32,
            "device": reference.device,
        }
        self.lora_A = nn.Parameter(torch.empty((self.rank, *a_shape), **factory))
        self.lora_B = nn.Parameter(torch.empty((b_shape[0], self.rank // groups, *b_shape[1:]), **factory))
        self.register_parameter("lora_B_bias", None)  # lora_bias: b_B
        self.register_parameter("trained_bias", None)  # bias other than "none": the layer's trained bias
        self.has_output_bias = False
        self.dropout_probability = config.lora_dropout
        self.velora: nn.Module | None = None  # velora_config: the input's compression for backward (LoraLinear)
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
        """(dropout(x) Aᵀ, the scaling that goes with it); dropout only in training."""
        x = x.to(self.lora_A.dtype)
        down = self.down_projection()
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


class LoraPeft(PeftCodec):
    """LoRA in peft's files: the config fields under the same names (targets, ranks and alphas as the
    resolved full module names, so peft adapts exactly these modules with the same shapes) and the
    tensors `lora_A.weight` / `lora_B.weight` (embeddings: `lora_embedding_A` / `lora_embedding_B`)."""

    peft_type = "LORA"
    tensor_names = {
        LoraAdapter: {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_B_bias": "lora_B.bias",
            "trained_bias": "base_layer.bias",
            "velora.projection": "lora_velora_embed",
        },
        TokenRows: {"rows": "token_adapter.trainable_tokens_delta"},
        TrainedBias: {"bias": "bias"},
        LoraEmbedding: {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
        "deltatune.methods.dora.DoraNorm": {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_magnitude_vector": "lora_magnitude_vector",
        },
        "deltatune.methods.lora_kasa_layer.KasaLinear": {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_diag": "lora_diag",
            "lora_B_bias": "lora_B.bias",
            "trained_bias": "base_layer.bias",
        },
        "deltatune.methods.lora_mha.LoraMultiheadAttention": {
            "factors.in_proj.lora_A": "lora_A.weight",
            "factors.in_proj.lora_B": "lora_B.weight",
            "factors.out_proj.lora_A": "base_layer.out_proj.lora_A.weight",
            "factors.out_proj.lora_B": "base_layer.out_proj.lora_B.weight",
        },
        "deltatune.methods.dora.DoraEmbedding": {
            "lora_A": "lora_embedding_A",
            "lora_B": "lora_embedding_B",
            "lora_magnitude_vector": "lora_magnitude_vector",
        },
    }

    def check_keys(self, data: dict[str, Any]) -> None:
        check_lora_keys(data)

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        """LoRA on parameters: peft nests one wrapper per parameter, the module's first parameter innermost,
        so `<parameter>.lora_A` of the k-th of n is `<module>` + `.base_layer` × (n − 1 − k) + `.lora_A.weight`."""
        from .lora_parameter import LoraParameters  # it builds on this module's classes

        if not isinstance(adapter, LoraParameters) or tensor_name in lookup_type(self.tensor_names, type(adapter), {}):
            return super().tensor_key(module_name, adapter, tensor_name)
        parameter, factor = tensor_name.split(".")[-2:]  # "factors.<parameter>.lora_A"
        order = list(adapter.factors)
        depth = len(order) - 1 - order.index(parameter)
        return f"{self.model_prefix}{module_name}{BASE_LAYER * depth}.{factor}.weight"

    def config_to_peft(self, config: LoraConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        from .lora_parameter import peft_targets

        target_modules, target_parameters = peft_targets(config, targets, model)
        named = [*target_modules, *(target_parameters or [])]  # what peft matches its patterns against
        check_init_writable(config.init_lora_weights)
        return {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "use_rslora": config.use_rslora,
            "init_lora_weights": True if config.init_lora_weights == "loftq" else config.init_lora_weights,
            "target_modules": target_modules,
            "target_parameters": target_parameters,
            "rank_pattern": {re.escape(n): config.rank_for(n) for n in named if config.rank_for(n) != config.r},
            "alpha_pattern": {
                re.escape(n): config.alpha_for(n) for n in named if config.alpha_for(n) != config.lora_alpha
            },
            "bias": config.bias,
            "lora_bias": config.lora_bias,
            "trainable_token_indices": config.trainable_token_indices,
            "use_dora": config.use_dora,
            "use_bdlora": None if config.use_bdlora is None else dataclasses.asdict(config.use_bdlora),
            "kasa_config": None if config.kasa_config is None else dataclasses.asdict(config.kasa_config),
            "eva_config": eva_config_for_peft(config),
            "velora_config": velora_config_for_peft(config),
        }

    def config_from_peft(self, data: dict[str, Any]) -> LoraConfig:
        fields = {key: data[key] for key in LORA_READ if data.get(key) is not None}
        if not accepts(field_types(LoraConfig)["init_lora_weights"], fields.get("init_lora_weights", True)):
            fields["init_lora_weights"] = True  # another spelling peft takes ("Gaussian"): the weights are in the file
        return LoraConfig(**fields)


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
        elif config.use_bdlora is not None:
            from .lora_block_diagonal_layers import build_block_diagonal  # it builds on this module's classes

            adapter = build_block_diagonal(module, module_name, config)
        else:
            adapter = super().build_adapter(module, module_name, config)
        add_velora(adapter, module, module_name, config)
        add_bias_terms(adapter, module, module_name, config)
        return adapter

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
