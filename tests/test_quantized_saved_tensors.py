"""No dequantized copy of a base weight is kept alive in training (issue 12): during a LoRA training
step on a quantized base, autograd saves for backward no floating-point tensor of a base weight's
shape (out × in or its transpose) other than the model's own parameters. Seen through
`torch.autograd.graph.saved_tensors_hooks`, which is handed every tensor an autograd node saves.

bitsandbytes' 4-bit and 8-bit layers dequantize again in backward and save only their packed storage.
torchao's int8 weight-only tensors and optimum-quanto's QLinear would save the dequantized float32
weight of every layer until backward (their own autograd); at adapted layers deltatune runs them on the
input detached and gives the input its gradient by dequantizing again (`deltatune.quantized_grad`). The
reference for those gradients is the library's own layer (the same model with that rejoining off)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import quantized_linear
from test_quantized import quantizable_llama, storage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = {
    "nf4": "bitsandbytes",
    "fp4": "bitsandbytes",
    "int8": "bitsandbytes",
    "torchao-int8": "torchao",
    "quanto-int8": "optimum.quanto",
    "quanto-int4": "optimum.quanto",
}
REJOINED = ["torchao-int8", "quanto-int8", "quanto-int4"]
"""The backends whose own autograd saves the dequantized weight (`QuantizedLinear.saves_dequantized`)."""


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum)
        return False


def backend_case(kind: str) -> pytest.param:
    return pytest.param(
        kind, marks=pytest.mark.skipif(not installed(BACKENDS[kind]), reason=f"{BACKENDS[kind]} is not installed")
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama (64 wide: bitsandbytes' 4-bit blocks are 64), saved for quantized loads."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    quantizable_llama().save_pretrained(folder)
    return folder


def storage_pointer(tensor: torch.Tensor) -> int | None:
    """Where a tensor's storage starts; None for a wrapper tensor subclass (a quantized weight), which has none."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def saved_weight_shaped_tensors(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> list[tuple[int, ...]]:
    """Shapes of the non-parameter float tensors saved for backward during `step()` whose shape is a
    quantized layer's weight shape (out × in) or its transpose."""
    weight_shapes = set()
    for module in model.modules():
        row = quantized_linear(module)
        if row is not None:
            shape = (row.out_features(module), row.in_features(module))
            weight_shapes |= {shape, shape[::-1]}
    assert weight_shapes, "the model has no quantized layer"
    parameters = {storage_pointer(parameter) for parameter in model.parameters()} - {None}
    found = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if (
            tensor.is_floating_point()
            and tuple(tensor.shape) in weight_shapes
            and storage_pointer(tensor) not in parameters
        ):
            found.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return found


def quantized_lora(checkpoint: Path, kind: str, **lora: object) -> deltatune.DeltaModel:
    from deltatune.train.quantize import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quantization_config(kind), device_map={"": "cpu"}, dtype=torch.float32
    )
    return deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules=LINEAR_LAYERS, **lora)).train()


INPUT_IDS = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))  # 10 rows: no weight shape


@pytest.mark.parametrize("kind", [backend_case(kind) for kind in BACKENDS])
def test_a_lora_step_on_a_quantized_base_saves_no_dequantized_weight_for_backward(checkpoint: Path, kind: str) -> None:
    wrapped = quantized_lora(checkpoint, kind)
    input_ids = INPUT_IDS

    found = saved_weight_shaped_tensors(wrapped, lambda: deltatune.causal_lm_loss(wrapped, input_ids, None, input_ids))
    assert found == []


def _gradients(model: deltatune.DeltaModel, rejoined: bool) -> dict[str, torch.Tensor]:
    """∂L/∂(input embeddings) and ∂L/∂(each LoRA weight) for one loss, with the sites' rejoining on or off."""
    for _, site in model.sites():
        site.rejoins_input = rejoined
    model.zero_grad()
    embeddings = model.base_model.get_input_embeddings()(INPUT_IDS).detach().requires_grad_(True)
    output = model(inputs_embeds=embeddings).logits
    output.square().mean().backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return {"inputs_embeds": embeddings.grad, "logits": output.detach(), **gradients}


@pytest.mark.parametrize("kind", [backend_case(kind) for kind in REJOINED])
def test_rejoined_input_gradients_equal_the_library_layers_own(checkpoint: Path, kind: str) -> None:
    model = quantized_lora(checkpoint, kind, init_lora_weights=False)
    sites = dict(model.sites())
    assert len(sites) == 2 * len(LINEAR_LAYERS) and all(site.rejoins_input for site in sites.values())
    before = storage(model.base_model)
    ours, library = _gradients(model, rejoined=True), _gradients(model, rejoined=False)
    assert ours.keys() == library.keys() and len(ours) == 2 + 2 * len(LINEAR_LAYERS) * 2
    torch.testing.assert_close(ours.pop("logits"), library.pop("logits"), atol=0, rtol=0)
    for name in ours:
        torch.testing.assert_close(ours[name], library[name], atol=1e-5, rtol=1e-5, msg=name)
    after = storage(model.base_model)
    assert before and before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
