"""LoRA on `nn.MultiheadAttention`, as peft does it: on its packed query/key/value projection
`in_proj_weight` (3·E × E) and on its output projection `out_proj.weight` (E × E).

    in_proj_weight' = W_in + s · B_in A_in           A_in: r × E,  B_in: 3E × r
    out_proj.weight' = W_out + 2 · s · B_out A_out   A_out: r × E, B_out: E × r

The 2 is peft's: its `MultiheadAttention` adds the output projection's ΔW itself and then once more through
the LoRA Linear it wraps `out_proj` in (peft 0.21.2 and its main branch, in the forward and in merges
alike), so every peft adapter of an attention module was trained, and computes, with twice s·B A there.
deltatune computes the same, so folders carry over both ways with the same outputs (`OUT_PROJ_REPEATS`).

The module never calls a Linear's forward for either (torch computes attention functionally from the
weights), so no output hook could add a LoRA term: the adapter is `LoraParameters` on these two
parameters, which read W + ΔW for the length of each call (`lora_parameter`). Merging adds both ΔW.
peft's files name the in-projection's factors `<mha>.lora_A.weight` / `lora_B.weight` and the output
projection's `<mha>.base_layer.out_proj.lora_A.weight` / `lora_B.weight`. As in peft: query, key and
value must share the embedding size (one `in_proj_weight`), no DoRA, no mixed batches; `lora_dropout`
has no effect here (peft folds the weights too, so no input is dropped).
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from .lora import LoraConfig
from .lora_parameter import LoraParameters

OUT_PROJ_REPEATS = 2
"""How many times peft adds the output projection's ΔW (see the module docstring)."""


class LoraMultiheadAttention(LoraParameters):
    """LoRA on an `nn.MultiheadAttention`'s `in_proj_weight` and `out_proj.weight`."""

    rank_by_parameter = False  # both take the rank and alpha of the module, as in peft

    def __init__(self, module: nn.MultiheadAttention, module_name: str, config: LoraConfig) -> None:
        if not module._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                f"LoRA on {module_name} (a MultiheadAttention with kdim/vdim unlike embed_dim, so separate query, key "
                "and value weights) is not supported, as in peft: leave it out of target_modules"
            )
        super().__init__(module, module_name, {"in_proj": "in_proj_weight", "out_proj": "out_proj.weight"}, config)
        self.factors["out_proj"].scaling *= OUT_PROJ_REPEATS
