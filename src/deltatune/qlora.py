"""The preparation a quantized frozen base needs before its adapter trains (QLoRA: Dettmers et al., 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", §3).

A base loaded with a `quantization_config` keeps its linear weights packed (4-bit or 8-bit storage),
and often everything else in 16-bit: the layer norms, the embeddings and the output head. Training an
adapter on it in 16-bit loses the small updates the adapter makes (a bfloat16 norm gain has 8 bits of
mantissa, and a norm's mean of squares overflows float16 on long inputs). The preparation:

1. every floating parameter in 16-bit outside the quantized layers (norms, embeddings, head, position
   tables) becomes float32, in place; the quantized layers are left as they are, storage and bias.
   This is done where the quantized layers return their input's dtype (bitsandbytes: they compute in
   their compute dtype and cast back), so that float32 then flows through the whole model. optimum-quanto
   and torchao layers return their weight's 16-bit dtype: widening the norms around them mixes float32
   and bfloat16 inside attention (which refuses it), so such a base is left in its dtype (`WIDENED`),
2. with `gradient_checkpointing=True`, the input embeddings' output requires grad, so that a
   checkpointed block (above all a reentrant one, which gives no gradient at all when none of its
   inputs requires one) passes gradients through the frozen embeddings to the adapters inside it,
3. bitsandbytes 4-bit layers keep their portable layout (`TRAINABLE_LAYOUT`). On a CPU with
   avx512-bf16, bitsandbytes repacks a frozen 4-bit layer for a faster kernel at its first call in eval
   mode without gradients (an evaluation), and from then on, in training too, the layer's backward
   passes no gradient through its weights to its input: an adapter below it (on a Llama the LoRA of
   q/k/v/gate/up, a prompt, a prefix) gets only the part of its gradient that runs through the
   adapters above, and silently learns from that. A layer repacked already is unpacked again, as
   bitsandbytes' own `state_dict()` does.

Where peft's `prepare_model_for_kbit_training` differs, and why:

- peft freezes every parameter; `deltatune.attach` freezes the base itself, so nothing is done here.
- peft casts every 16-bit parameter that is not bitsandbytes' `Params4bit`, the bias of a 4-bit layer
  included, skips the whole cast for torchao (and GPTQ, HQQ...), and on a bfloat16 optimum-quanto base
  fails (it tries to cast the quantized weights: "The dtype of a weights Tensor cannot be changed").
  Here the quantized layers are skipped whole, weight and bias (a layer computes in its compute dtype,
  which its bias follows), and only bitsandbytes bases are widened (see 1.); on a Llama in bitsandbytes
  nf4 the result is peft's, parameter for parameter.
- peft turns gradient checkpointing on (reentrant by default, hence its need of input gradients). Here
  checkpointing itself stays the caller's: `DeltaModel.gradient_checkpointing_enable` (non-reentrant),
  or the trainer's `gradient_checkpointing: true`.
- peft does not do 3: on such a CPU, its training after an evaluation gets the same partial gradients.
- peft decides by the model's `is_loaded_in_4bit` / `quantization_method` flags. Here it is the layers
  themselves (`deltatune.quantized.is_quantized`): a base without a quantized linear is left untouched,
  wherever it came from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import DeltaTuneError
from .methods.base import lookup_type
from .quantized import quantized_linear

HALF_PRECISION = (torch.float16, torch.bfloat16)
"""The dtypes the preparation widens to float32."""
WIDENED = frozenset({"bitsandbytes"})
"""The backends (`QuantizedLinear.package`) whose layers return their input's dtype, so the rest of the
base can compute in float32 around them."""


def _bnb_4bit_portable_layout(module: nn.Module) -> None:
    """No repacking for bitsandbytes' CPU inference kernel; a layer repacked already is unpacked."""
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


TRAINABLE_LAYOUT: dict[str, Callable[[nn.Module], None]] = {
    "bitsandbytes.nn.modules.Linear4bit": _bnb_4bit_portable_layout,
}
"""Quantized layer types (by dotted name) whose storage layout must be set for training: what does it."""


def prepare_quantized_base(model: nn.Module, gradient_checkpointing: bool = False) -> list[str]:
    """Prepare `model`, a base with quantized linear layers, for training an adapter on it: its 16-bit
    floating parameters outside the quantized layers in float32 (bitsandbytes bases), its 4-bit layers
    in a layout that gives gradients, and with `gradient_checkpointing`, its input embeddings' output
    requiring grad. Call it on the base before `attach`. A model without a quantized linear layer is
    left as it is. Returns the names of the parameters it cast."""
    rows = {name: quantized_linear(module) for name, module in model.named_modules()}
    quantized = {name: row.package for name, row in rows.items() if row is not None}
    if not quantized:
        return []
    keep_trainable_layout(model)
    if gradient_checkpointing:
        _input_embeddings_require_grad(model)
    if not set(quantized.values()) <= WIDENED:
        return []
    cast = []
    for module_name, module in model.named_modules():
        if module_name in quantized:
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.dtype in HALF_PRECISION:
                parameter.data = parameter.data.to(torch.float32)
                cast.append(f"{module_name}.{parameter_name}" if module_name else parameter_name)
    return cast


def keep_trainable_layout(model: nn.Module) -> None:
    """Put every quantized layer of `model` whose type needs it in the storage layout that gives input
    gradients (3. above). `deltatune.attach` and a trainable `deltatune.load` do it, so an adapter never
    trains on a partial gradient after an evaluation, prepared base or not."""
    for module in model.modules():
        if quantized_linear(module) is not None:
            lookup_type(TRAINABLE_LAYOUT, type(module), default=lambda module: None)(module)


def _input_embeddings_require_grad(model: nn.Module) -> None:
    """transformers' own hook where the model has it (`enable_input_require_grads`), else one on the
    input embeddings."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    if not hasattr(model, "get_input_embeddings"):
        raise DeltaTuneError(
            f"prepare_quantized_base: {type(model).__name__} has no get_input_embeddings(), so its input cannot be "
            "made to require grad; give it one, or use non-reentrant checkpointing and gradient_checkpointing=False"
        )
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
