"""No dequantized copy of a base weight is kept alive in training (issue 12): during a LoRA training
step on a quantized base, autograd saves for backward no floating-point tensor of a base weight's
shape (out × in or its transpose) other than the model's own parameters. Seen through
`torch.autograd.graph.saved_tensors_hooks`, which is handed every tensor an autograd node saves.

bitsandbytes' 4-bit and 8-bit layers dequantize again in backward and save only their packed storage.
torchao's int8 weight-only tensors and optimum-quanto's QLinear save the dequantized float32 weight
of every layer until backward (measured here, their own autograd): those cases are expected failures
(strict, so a backend release that stops doing it shows up)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import quantized_linear
from test_quantized import quantizable_llama

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
SAVES_DEQUANTIZED = {"torchao-int8", "quanto-int8", "quanto-int4"}


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum)
        return False


def backend_case(kind: str) -> pytest.param:
    marks = [pytest.mark.skipif(not installed(BACKENDS[kind]), reason=f"{BACKENDS[kind]} is not installed")]
    if kind in SAVES_DEQUANTIZED:
        marks.append(
            pytest.mark.xfail(strict=True, reason=f"{kind}: the backend's own autograd saves the dequantized weight")
        )
    return pytest.param(kind, marks=marks)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama (64 wide: bitsandbytes' 4-bit blocks are 64), saved for quantized loads."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    quantizable_llama().save_pretrained(folder)
    return folder


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
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    found = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if (
            tensor.is_floating_point()
            and tuple(tensor.shape) in weight_shapes
            and tensor.untyped_storage().data_ptr() not in parameters
        ):
            found.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return found


@pytest.mark.parametrize("kind", [backend_case(kind) for kind in BACKENDS])
def test_a_lora_step_on_a_quantized_base_saves_no_dequantized_weight_for_backward(checkpoint: Path, kind: str) -> None:
    from deltatune.train.quantize import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quantization_config(kind), device_map={"": "cpu"}, dtype=torch.float32
    )
    wrapped = deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules=LINEAR_LAYERS)).train()
    input_ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))  # 10 rows: no weight shape

    found = saved_weight_shaped_tensors(wrapped, lambda: deltatune.causal_lm_loss(wrapped, input_ids, None, input_ids))
    assert found == []
