"""A non-finite adapter is never loaded or saved silently, in any format.

Loading refuses, by tensor and folder and before anything is copied, a float tensor holding NaN or ±inf and a
tensor whose kind (float or not) is not the model part's: a NaN lora_A otherwise gives finite but wrong logits
(attention hides the NaN), and an int64 or bool tensor was cast to float without a word. Saving refuses an
adapter holding NaN or ±inf, by tensor, with the old folder left as it was. The reference for "nothing
loaded" is the plain base model's own output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.errors import AdapterFileError, TrainingDivergedError
from tiny_models import build, run

FORMATS = ("deltatune", "peft", "adapterhub")

BAD_TENSORS = {
    "nan": lambda values: torch.full_like(values, float("nan")),
    "inf": lambda values: torch.full_like(values, float("inf")),
    "minus-inf-one-entry": lambda values: values.clone().index_fill_(0, torch.tensor([0]), float("-inf")),
    "nan-float16": lambda values: torch.full_like(values, float("nan"), dtype=torch.float16),
    "int64": lambda values: (values * 100).long(),
    "bool": lambda values: values > 0,
}
"""How a hand-edited or hostile weights file changes the q_proj lora_A."""

MESSAGES = {"nan": "non-finite", "inf": "non-finite", "minus-inf-one-entry": "non-finite", "nan-float16": "non-finite"}
"""What the refusal says, by case (the rest: the tensor's dtype)."""


def lora(seed: int = 0) -> deltatune.DeltaModel:
    """A tiny Llama with a LoRA on q_proj and v_proj whose factors are random (the adapter changes the output)."""
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return delta_model


def weights_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
@pytest.mark.parametrize("format", FORMATS)
def test_load_refuses_a_non_finite_or_non_float_tensor_by_name_and_loads_nothing(tmp_path, format, case):
    folder = tmp_path / format
    lora().save(str(folder), format=format)
    tensors = load_file(weights_file(folder))
    key = next(key for key in tensors if "q_proj" in key and "lora_A" in key)
    save_file({**tensors, key: BAD_TENSORS[case](tensors[key])}, weights_file(folder))
    model = build("llama")
    with torch.no_grad():
        base_output = run(model, "llama")
    with pytest.raises(AdapterFileError) as refusal:
        deltatune.load(model, str(folder))
    message = str(refusal.value)
    assert "\n" not in message and str(folder) in message and "q_proj" in message
    assert MESSAGES.get(case, str(BAD_TENSORS[case](torch.ones(1)).dtype).removeprefix("torch.")) in message
    with torch.no_grad():
        assert torch.equal(run(model, "llama"), base_output)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("format", FORMATS)
def test_save_refuses_a_non_finite_adapter_by_name_and_keeps_the_old_folder(tmp_path, format, value):
    delta_model = lora()
    folder = tmp_path / "adapter"
    delta_model.save(str(folder), format=format)
    before = folder_bytes(folder)
    parameter = next(value for name, value in delta_model.named_parameters() if "v_proj" in name and "lora_B" in name)
    with torch.no_grad():
        parameter[0, 0] = value
    with pytest.raises(TrainingDivergedError) as refusal:
        delta_model.save(str(folder), format=format)
    message = str(refusal.value)
    assert "\n" not in message and "v_proj" in message and "lora_B" in message and "diverged" in message
    assert folder_bytes(folder) == before
    with pytest.raises(TrainingDivergedError):
        delta_model.save(str(tmp_path / "fresh"), format=format)
    assert not (tmp_path / "fresh").exists()


def test_save_of_a_finite_adapter_loads_back_exactly(tmp_path):
    """The checks refuse only what they should: a finite adapter saves and loads with its outputs unchanged."""
    delta_model = lora()
    with torch.no_grad():
        adapted_output = run(delta_model, "llama")
    delta_model.save(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(run(deltatune.load(build("llama"), str(tmp_path / "adapter")), "llama"), adapted_output)


OVERFLOWS = {torch.float16: 1e5, torch.bfloat16: 3.4e38}
"""A float32 value that is finite but beyond each half-precision dtype's range (float16's largest is 65504,
bfloat16's about 3.39e38)."""


def _overflowing_folder(folder: Path, dtype: torch.dtype, head: bool) -> str:
    """A float32 LoRA (with the classifier head kept whole, if `head`) saved with one tensor at a value finite in
    float32 but beyond `dtype`'s range; the name of the tensor that would overflow."""
    config = deltatune.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"] if head else None)
    delta_model = deltatune.attach(build("bert"), config)
    name, parameter = next(
        (name, parameter)
        for name, parameter in delta_model.named_parameters()
        if parameter.requires_grad
        and name.endswith("classifier.deltatune.adapters.default.copy.weight" if head else "lora_A")
    )
    with torch.no_grad():
        parameter[0, 0] = OVERFLOWS[dtype]
    delta_model.save(str(folder))
    return "classifier" if head else "lora_A"


@pytest.mark.parametrize("head", [False, True], ids=["lora-kept-in-model-dtype", "head-on-the-default-path"])
@pytest.mark.parametrize("dtype", list(OVERFLOWS), ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_load_refuses_a_finite_tensor_that_the_models_dtype_would_make_inf_and_loads_nothing(tmp_path, dtype, head):
    """The check is on what the model would hold (after the cast to its part's dtype), not on the file's values:
    a head kept whole stays in the model's dtype even with autocast_adapter_dtype=True, LoRA with it False."""
    folder = tmp_path / "adapter"
    tensor = _overflowing_folder(folder, dtype, head)
    model = build("bert").to(dtype)
    with torch.no_grad():
        base_output = run(model, "bert")
    with pytest.raises(AdapterFileError) as refusal:
        deltatune.load(model, str(folder), autocast_adapter_dtype=head)
    message = str(refusal.value)
    assert "\n" not in message and str(folder) in message and tensor in message
    assert f"{OVERFLOWS[dtype]:.4g}" in message and str(dtype).removeprefix("torch.") in message
    with torch.no_grad():
        assert torch.equal(run(model, "bert"), base_output)


def test_restore_refuses_a_checkpoint_that_the_models_dtype_would_make_inf_and_copies_nothing(tmp_path):
    """A trainer's resume shares the check: the model's adapter (float16 here) keeps its values."""
    from deltatune.restore import restore_weights

    folder = tmp_path / "checkpoint"
    _overflowing_folder(folder, torch.float16, head=False)
    delta_model = deltatune.attach(
        build("bert").to(torch.float16),
        deltatune.LoraConfig(r=2, target_modules=["query"]),
        autocast_adapter_dtype=False,
    )
    before = {name: tensor.clone() for name, tensor in delta_model.state_dict().items()}
    with pytest.raises(AdapterFileError, match="lora_A.*float16"):
        restore_weights(delta_model, folder)
    assert all(torch.equal(tensor, before[name]) for name, tensor in delta_model.state_dict().items())
