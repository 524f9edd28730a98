"""LoRA on chosen parts of a fused projection's output (`LoraConfig.fused_slices`), as loralib's and
AdapterHub's merged linear compute it: GPT-2's `c_attn` is one layer whose output holds q, k and v as three
equal parts, and LoRA with `fused_slices={"c_attn": [True, False, True]}` adapts q and v only.

The output's F features split into P equal parts of d = F / P; the n enabled ones each get their own rank-r
pair (A_g: r × in, B_g: d × r), stacked as AdapterHub saves them:

    lora_A = [A_1; …; A_n]   (n·r × in)         lora_B = [B_1; …; B_n]   (n·d × r)
    y[part of g] = W x + b + s · B_g A_g dropout(x)      (s = α / r, the same for every part)
    y[other parts] = W x + b

so ΔW is s · diag(B_1, …, B_n) A with its rows laid on the enabled parts' features and zero elsewhere (the
up projection `up_projection` builds), and LoRA's own forward, mixed batches and merge run on it. Gated
(`use_gating`, UniPELT), the gate has one head per enabled part and part g's term is multiplied by its head
g_g = mean_t σ(W_g[g] x_t + b_g[g]) instead of s. On `nn.Linear`, GPT-2's `Conv1D` and the quantized linears
of `deltatune.quantized` (float32 factors from the logical shape, as `LoraQuantizedLinear`'s).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..quantized import quantized_linear
from .base import lookup_type
from .gating import make_gate
from .lora import Lora, LoraAdapter, LoraLinear, LoraQuantizedLinear
from .lora_block_diagonal_layers import block_diagonal
from .lora_config import PLAIN_STARTS, LoraConfig
from .lora_gating import GatedLoraLinear

OTHER_LAYER_FORMS = {
    "use_dora": True,
    "kasa_config": None,
    "use_bdlora": None,
    "lora_bias": True,
    "velora_config": None,
    "monteclora_config": None,
}
"""LoRA options that change the layer the parts would share (the value that turns each on, or None: any
value but None): refused beside `fused_slices`."""


def check_slice_options(config: LoraConfig) -> None:
    """Every pattern enables a part, and nothing else reshapes the layer (its own bias included)."""
    for pattern, enabled in config.fused_slices.items():
        if not any(enabled):
            raise DeltaTuneError(
                f"fused_slices[{pattern!r}] = {enabled} enables no part of the layer's output; mark at least one "
                "part True, or leave the pattern out"
            )
    taken = [
        name
        for name, value in OTHER_LAYER_FORMS.items()
        if (getattr(config, name) is not None if value is None else getattr(config, name) == value)
    ]
    if config.bias != "none":
        taken.append(f"bias={config.bias!r}")
    if not (isinstance(config.init_lora_weights, bool) or config.init_lora_weights in PLAIN_STARTS):
        taken.append(f"init_lora_weights={config.init_lora_weights!r}")
    if taken:
        raise DeltaTuneError(
            f"fused_slices (LoRA on parts of a fused projection) goes with plain LoRA layers; turn off {taken}"
        )


def weight_geometry(module: nn.Module) -> tuple[int, int, bool, torch.Tensor]:
    """(in, out, whether the weight is stored in × out, the tensor the factors take dtype and device from) of
    an `nn.Linear` or a `Conv1D`."""
    transposed = not isinstance(module, nn.Linear)
    in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
    return in_features, out_features, transposed, module.weight


def quantized_geometry(module: nn.Module) -> tuple[int, int, bool, torch.Tensor]:
    """The same for a quantized linear: its logical shape, float32 factors (its packed weight is not a float)."""
    row = quantized_linear(module)
    reference = torch.empty(0, dtype=torch.float32, device=module.weight.device)
    return row.in_features(module), row.out_features(module), False, reference


GEOMETRIES = {LoraLinear: weight_geometry, LoraQuantizedLinear: quantized_geometry}
"""Plain LoRA's layer for the module's type → how a fused-parts LoRA reads that module's shape."""


class FusedSliceLora(LoraLinear):
    """`LoraLinear` over the enabled parts of the layer's output: a rank-r pair per part (module docstring)."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        geometry = GEOMETRIES[lookup_type(Lora.adapter_types, type(module))]
        in_features, out_features, self.transposed, reference = geometry(module)
        enabled = config.slices_for(module_name)
        if out_features % len(enabled):
            raise UnsupportedModuleError(
                f"{module_name} has {out_features} output features, which do not split into {len(enabled)} equal "
                f"parts (fused_slices {enabled}): list one entry per part of its fused output"
            )
        part = out_features // len(enabled)
        self.parts = sum(enabled)
        LoraAdapter.__init__(
            self,
            (in_features,),
            (part * self.parts,),
            module_name,
            config,
            reference,
            groups=self.parts,
            parts=self.parts,
        )
        chosen = torch.tensor(enabled)
        features = torch.arange(out_features).view(len(enabled), part)
        rows = features[chosen].reshape(-1)
        self.register_buffer("feature_rows", rows.to(reference.device), persistent=False)
        """The output features of the enabled parts, in order: where B's rows land."""
        owners = torch.zeros(len(enabled), dtype=torch.long)
        owners[chosen] = torch.arange(self.parts)
        self.register_buffer("feature_parts", owners.repeat_interleave(part).to(reference.device), persistent=False)
        """For every output feature, the enabled part whose values it takes (0 for a disabled part's feature,
        whose term is zero)."""
        self.out_features = out_features
        self.total_parts = len(enabled)

    def up_projection(self) -> torch.Tensor:
        """diag(B_1, …, B_n) laid on the enabled parts' rows of an (out × n·r) matrix, zero elsewhere."""
        blocks = block_diagonal(self.lora_B, self.parts)
        return blocks.new_zeros(self.out_features, blocks.shape[1]).index_copy(0, self.feature_rows, blocks)

    def per_output_feature(self, values: torch.Tensor) -> torch.Tensor:
        """Values per enabled part (… × n) spread over the output features (… × out)."""
        return values.index_select(-1, self.feature_parts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.parts} of {self.total_parts} output parts"


class GatedFusedSliceLora(FusedSliceLora, GatedLoraLinear):
    """`FusedSliceLora` whose parts are each multiplied by their own head of a gate of the input instead of s
    (`GatedLoraLinear`'s forward, its gate spread over the parts' features)."""

    def __init__(self, module: nn.Module, module_name: str, config: LoraConfig) -> None:
        FusedSliceLora.__init__(self, module, module_name, config)
        self.scaling = 1.0  # the gate takes its place (AdapterHub); dropout's 1/(1-p) still rides on it
        self.gate = make_gate(self.lora_A.shape[1], self.parts, self.lora_A)


FUSED_LAYERS = {False: FusedSliceLora, True: GatedFusedSliceLora}
"""`use_gating` → the layer of a LoRA on fused parts."""


def build_fused_slices(module: nn.Module, module_name: str, config: LoraConfig) -> FusedSliceLora:
    if lookup_type(Lora.adapter_types, type(module), None) not in GEOMETRIES:
        raise UnsupportedModuleError(
            f"{module_name}: LoRA on parts of a fused output (fused_slices) runs on nn.Linear, Conv1D and quantized "
            f"linear layers, not on a {type(module).__name__}; leave it out of fused_slices"
        )
    return FUSED_LAYERS[config.use_gating](module, module_name, config)
