"""The lean gated MLP (`deltatune.gated_mlp`): bitwise the model's own losses and gradients, two tensors a
block kept for backward instead of four, the product freed after the forward, the model restored."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import deltatune
from deltatune import gated_mlp
from deltatune.gated_mlp import disable_lean_gated_mlp, enable_lean_gated_mlp, lean_gated_mlp
from deltatune.losses import causal_lm_loss
from deltatune.train.cli import main
from resume_checks import adapter_tensors
from tiny_models import gpt2
from training_fixtures import task_config

INTERMEDIATE = 80
SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_key_value_heads=2)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SHAPE, num_key_value_heads=2, head_dim=8)),  # tanh-GELU
}
ADAPTERS = {
    "lora-dropout": lambda: deltatune.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]
    ),
    "lora-down-only": lambda: deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]),
    "lora-attention-only": lambda: deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: deltatune.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}


def _adapted(architecture: str, adapter: str) -> deltatune.DeltaModel:
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().train()
    delta_model = deltatune.attach(model, ADAPTERS[adapter]())
    with torch.no_grad():  # adapters away from their identity start, so every gradient flows
        for parameter in delta_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return delta_model


def _loss_and_gradients(
    delta_model: deltatune.DeltaModel, lean: bool, checkpointing: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if checkpointing:
        delta_model.gradient_checkpointing_enable()
    input_ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout draws in both runs
    with lean_gated_mlp(delta_model, lean):
        loss = causal_lm_loss(delta_model, input_ids, None, input_ids.clone())
        loss.backward()
    gradients = {name: p.grad for name, p in delta_model.named_parameters() if p.requires_grad}
    return loss.detach(), gradients


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_loss_and_every_gradient_are_bitwise_the_model_own(architecture, adapter, checkpointing) -> None:
    own_loss, own = _loss_and_gradients(_adapted(architecture, adapter), False, checkpointing)
    lean_loss, lean = _loss_and_gradients(_adapted(architecture, adapter), True, checkpointing)
    assert torch.equal(own_loss, lean_loss)
    assert own.keys() == lean.keys() and own
    for name in own:
        assert torch.equal(own[name], lean[name]), name


def _saved_intermediate_tensors(delta_model: deltatune.DeltaModel) -> int:
    """Distinct storages of [batch, tokens, intermediate] tensors autograd keeps from one forward."""
    shapes: Counter = Counter()
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage().data_ptr()
        if storage not in seen and tensor.shape[-1:] == (INTERMEDIATE,) and tensor.dim() == 3:
            seen.add(storage)
            shapes[tuple(tensor.shape)] += 1
        return tensor

    input_ids = torch.randint(0, 96, (3, 11))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        causal_lm_loss(delta_model, input_ids, None, input_ids.clone())
    return sum(shapes.values())


def test_a_block_keeps_two_intermediate_tensors_instead_of_four(monkeypatch) -> None:
    monkeypatch.setattr(
        gated_mlp, "_outer_saved_tensor_hooks", lambda: False
    )  # the counting hooks are not a checkpoint
    delta_model = _adapted("llama", "lora-dropout")
    blocks = len(delta_model.base_model.model.layers)
    assert _saved_intermediate_tensors(delta_model) == 4 * blocks  # g, a(g), u and the product
    with lean_gated_mlp(delta_model) as count:
        assert count == blocks
        assert _saved_intermediate_tensors(delta_model) == 2 * blocks


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_the_product_is_freed_after_the_forward(adapter) -> None:
    """Nothing (a hook's closure, an adapter's context) keeps a block's product alive until backward."""
    delta_model = _adapted("llama", adapter)
    products: list[weakref.ref] = []
    for layer in delta_model.base_model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: products.append(weakref.ref(args[0])))
    input_ids = torch.randint(0, 96, (3, 11))
    with lean_gated_mlp(delta_model):
        loss = causal_lm_loss(delta_model, input_ids, None, input_ids.clone())
        assert products and all(reference() is None for reference in products)
        loss.backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_under_checkpointing_down_keeps_its_saved_tensors_to_the_checkpoint(checkpointing, monkeypatch) -> None:
    """Checkpointing drops a block's tensors after its forward and recomputes them: a recipe would keep g and u
    alive beside it, so under checkpointing's hooks none is made (and without them one a block)."""
    made: list[gated_mlp.ProductRecipe] = []
    monkeypatch.setattr(gated_mlp, "ProductRecipe", lambda *fields: made.append(fields) or fields)
    delta_model = _adapted("llama", "lora-down-only")
    if checkpointing:
        delta_model.gradient_checkpointing_enable()
    input_ids = torch.randint(0, 96, (3, 11))
    with lean_gated_mlp(delta_model):
        causal_lm_loss(delta_model, input_ids, None, input_ids.clone())
    assert len(made) == (0 if checkpointing else len(delta_model.base_model.model.layers))


def test_without_gradients_the_outputs_are_the_model_own_and_leaving_restores_the_model() -> None:
    delta_model = _adapted("gemma", "lora-dropout").eval()
    input_ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        own = delta_model(input_ids=input_ids).logits
        with lean_gated_mlp(delta_model):
            assert torch.equal(delta_model(input_ids=input_ids).logits, own)
    assert not any("forward" in vars(module) for module in delta_model.modules())


def test_models_without_a_recognised_gated_block_are_left_alone() -> None:
    model = gpt2()
    assert enable_lean_gated_mlp(model) == 0
    disable_lean_gated_mlp(model)
    assert not any("forward" in vars(module) for module in model.modules())


def test_the_trainer_trains_the_same_adapter_bitwise_either_way(tmp_path) -> None:
    adapters = {}
    for lean in (True, False):
        folder = tmp_path / str(lean)
        folder.mkdir()
        config = task_config(folder, "causal-lm", lean_gated_mlp=lean, max_steps=3)
        assert main(["train", str(config)]) == 0
        adapters[lean] = adapter_tensors(folder / "out")
    assert adapters[True].keys() == adapters[False].keys()
    for name, tensor in adapters[True].items():
        assert torch.equal(tensor, adapters[False][name]), name
