"""LoRA's settings (`LoraConfig`, peft's field names and defaults) and its default targets per model type;
the layers that compute it are in `lora.py`."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

from ..config import TargetedConfig
from ..field_check import DropoutRate, FullMatch, NonNegativeInt, PositiveInt, Regex
from ..targeting import pattern_value
from .lora_bias import check_bias_options
from .lora_block_diagonal import BdLoraConfig, check_block_diagonal_options
from .lora_corda import CordaConfig
from .lora_eva import EvaConfig
from .lora_kasa import KasaConfig, check_kasa_options
from .lora_monteclora import MontecloraConfig, check_monteclora_options
from .lora_velora import VeloraConfig, check_velora_options
from .trainable_tokens import check_token_indices

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
    monteclora_config: MontecloraConfig | dict[str, Any] | None = None
    """MonteCLoRA (`methods/lora_monteclora.py`): in training, A is a learned mixture of noisy copies of itself,
    with a regulariser to add to the loss (`deltatune.monteclora_loss`; `deltatune train` adds it); plain
    LoRA outside training and in merges (linear layers); a mapping is read as one."""
    use_gating: bool = False
    """A learned gate of the layer's input takes the place of s (UniPELT; AdapterHub's `use_gating`,
    `methods/lora_gating.py`): y = W x + b + g · B A dropout(x); Linear and Conv1D layers, not mergeable."""
    fused_slices: dict[Regex, list[bool]] = dataclasses.field(default_factory=dict)
    """{module name pattern: which equal parts of the module's output LoRA adapts} for a fused projection
    (`methods/lora_fused.py`; loralib's and AdapterHub's merged linear): {"c_attn": [True, False, True]} adapts
    the q and v thirds of GPT-2's c_attn, each with its own rank-r pair (and gate), and leaves k as it is."""

    def validate(self) -> None:
        super().validate()
        check_bias_options(self)
        check_block_diagonal_options(self)
        check_kasa_options(self)
        check_velora_options(self)
        check_monteclora_options(self)
        if self.use_gating:
            from .lora_gating import check_gating_options  # it builds on the LoRA layers

            check_gating_options(self)
        if self.fused_slices:
            from .lora_fused import check_slice_options  # it builds on the LoRA layers

            check_slice_options(self)
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
        if isinstance(self.monteclora_config, dict):
            self.monteclora_config = MontecloraConfig.from_dict(self.monteclora_config)

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def slices_for(self, module_name: str) -> list[bool] | None:
        """The enabled parts of the module's output (`fused_slices`), or None for a plain LoRA there."""
        return pattern_value(self.fused_slices, module_name, None)

    def scaling_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
