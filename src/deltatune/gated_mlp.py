"""Gated feed-forward blocks that keep two tensors for backward instead of four (`lean_gated_mlp`).

A gated MLP (SwiGLU, GeGLU: Llama, Mistral, Qwen, Gemma, OLMo, Granite, Cohere, SmolLM3) computes

    y = down(a(g) ⊙ u),   g = gate(x),  u = up(x),  a = SiLU or tanh-GELU.

Autograd keeps g (for a'), a(g) and u (for the product's two gradients) and the product p = a(g) ⊙ u,
which every adapter on `down` that needs its input keeps (LoRA's ∂A = (∂h)ᵀ p, IA3's ∂l = Σ p ⊙ ∂y):
four [tokens, intermediate] tensors a block, on SmolLM2-135M 703 of the 1,217 MiB a 1,000-token row
holds between forward and backward. Here the block keeps g and u only:

- `GatedProduct` computes p and saves (g, u); its backward recomputes a(g) and returns
  ∂u = ∂p ⊙ a(g) and ∂g = a'(g) ⊙ (∂p ⊙ u) with the activation's own backward kernel: the same
  operations autograd runs, so the gradients are bitwise those of the model's own forward (tested);
- inside `down`, every tensor saved on p's storage (by an adapter, a view of it) is packed as a recipe
  holding g and u, already kept, and rebuilt as a(g) ⊙ u when backward unpacks it
  (`torch.autograd.graph.saved_tensors_hooks`). Where hooks are in force already (non-reentrant gradient
  checkpointing's, which drop and recompute the whole block), `down` keeps its own: the block saves a(g)
  no more, and checkpointing still frees everything.

The cost is one activation and one product a block in backward, elementwise, against the matmuls of
the block. Without gradients (evaluation, generation) the block runs the model's own forward. A block
is recognised by its class (`GATED_MLP_CLASSES`, each checked to compute exactly the form above) and its
activation (`ACTIVATIONS`); anything else keeps its forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATED_MLP_CLASSES = frozenset(
    {
        "LlamaMLP",
        "MistralMLP",
        "Qwen2MLP",
        "Qwen3MLP",
        "GemmaMLP",
        "Gemma2MLP",
        "OlmoMLP",
        "Olmo2MLP",
        "GraniteMLP",
        "CohereMLP",
        "SmolLM3MLP",
    }
)
"""transformers' MLP classes whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, in 4.57 and 5.x."""

Activation = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

ACTIVATIONS: dict[str, Activation] = {
    "SiLUActivation": (F.silu, torch.ops.aten.silu_backward),
    "SiLU": (F.silu, torch.ops.aten.silu_backward),
    "GELUTanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
    ),
}
"""Activation class name → (a, (∂a, x) ↦ ∂x): its forward and the backward kernel autograd uses for it."""


class GatedProduct(torch.autograd.Function):
    """p = a(g) ⊙ u, keeping g and u; the backward recomputes a(g) (see the module docstring)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return activation[0](gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        forward, backward = ctx.activation
        grad_gate = backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * forward(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


@dataclass(frozen=True)
class ProductRecipe:
    """A saved tensor on the product's storage, packed as what rebuilds it: g, u and its view's layout."""

    gate: torch.Tensor
    up: torch.Tensor
    activation: Activation
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            product = self.activation[0](self.gate) * self.up
        return product.as_strided(self.size, self.stride, self.offset)


def _lean_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated block's forward, keeping g and u only (the model's own forward without gradients)."""
    activation = ACTIVATIONS[type(module.act_fn).__name__]
    if not torch.is_grad_enabled():
        return module.down_proj(activation[0](module.gate_proj(x)) * module.up_proj(x))
    gate, up = module.gate_proj(x), module.up_proj(x)
    product = GatedProduct.apply(gate, up, activation)
    storage, dtype = product.untyped_storage().data_ptr(), product.dtype
    kept_gate, kept_up = gate.detach(), up.detach()  # the hooks outlive the block: no reference to p itself

    def pack(tensor: torch.Tensor) -> torch.Tensor | ProductRecipe:
        if tensor.dtype == dtype and tensor.untyped_storage().data_ptr() == storage:
            return ProductRecipe(
                kept_gate, kept_up, activation, tensor.size(), tensor.stride(), tensor.storage_offset()
            )
        return tensor

    def unpack(packed: torch.Tensor | ProductRecipe) -> torch.Tensor:
        return packed.rebuild() if isinstance(packed, ProductRecipe) else packed

    if _outer_saved_tensor_hooks():  # checkpointing's own: inside a block of ours they would not apply
        return module.down_proj(product)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return module.down_proj(product)


def _outer_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are in force already (non-reentrant checkpointing's, a user's offloading):
    only the innermost pair applies, so ours would take the tensors saved in `down` away from them (under
    checkpointing, g and u would then live through the whole forward). Without torch's query: assume so."""
    query = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return query is None or query(False) is not None
    except TypeError:
        return True


def _is_gated_block(module: nn.Module) -> bool:
    return type(module).__name__ in GATED_MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in ACTIVATIONS


def enable_lean_gated_mlp(model: nn.Module) -> int:
    """Give every recognised gated MLP block of `model` the lean forward; returns how many blocks have it."""
    blocks = [module for module in model.modules() if _is_gated_block(module)]
    for module in blocks:
        module.forward = types.MethodType(_lean_forward, module)
    return len(blocks)


def disable_lean_gated_mlp(model: nn.Module) -> None:
    """Give every block `enable_lean_gated_mlp` changed its class's forward back."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _lean_forward:
            del module.forward


@contextlib.contextmanager
def lean_gated_mlp(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """A block in which `model`'s gated MLP blocks have the lean forward (`enabled`), as the trainer trains
    (`lean_gated_mlp: true`); yields how many blocks have it. On leaving, the model is as it was."""
    count = enable_lean_gated_mlp(model) if enabled else 0
    try:
        yield count
    finally:
        if count:
            disable_lean_gated_mlp(model)
