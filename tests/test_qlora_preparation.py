"""`deltatune.prepare_quantized_base`: the QLoRA preparation of a quantized frozen base. Checked against
peft's `prepare_model_for_kbit_training` on the same bfloat16 nf4 base (the same parameters cast, to the
same values), with the quantized storage untouched, and with reentrant gradient checkpointing, where a
block whose inputs need no gradient gives its adapters none (the reason for the input-gradient hook)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import is_quantized
from test_quantized import inputs, installed, needs_bitsandbytes, quantizable_llama, quantization, storage

peft = pytest.importorskip("peft")

pytestmark = [
    needs_bitsandbytes,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 64-wide Llama (bitsandbytes quantizes in blocks of 64) saved in float32."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    quantizable_llama(tie_word_embeddings=False).save_pretrained(path)
    return path


def load(folder: Path, kind: str | None, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    options = {"quantization_config": quantization(kind), "device_map": "cpu"} if kind else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)


def dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: parameter.dtype for name, parameter in model.named_parameters()}


def test_norms_embeddings_and_head_become_float32_as_peft_casts_them(folder: Path) -> None:
    ours, theirs = load(folder, "nf4"), load(folder, "nf4")
    assert ours.model.norm.weight.dtype == ours.lm_head.weight.dtype == torch.bfloat16
    cast = deltatune.prepare_quantized_base(ours)
    peft.prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    assert dtypes(ours) == dtypes(theirs)
    assert {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"} <= set(cast)
    assert all(dtypes(ours)[name] == torch.float32 for name in cast)
    reference = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        assert torch.equal(parameter, reference[name]), name


def test_the_quantized_storage_is_left_untouched(folder: Path) -> None:
    model = load(folder, "nf4")
    before = storage(model)
    states = {
        name: module.weight.quant_state.absmax.clone() for name, module in model.named_modules() if is_quantized(module)
    }
    deltatune.prepare_quantized_base(model)
    after = storage(model)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) and after[name].dtype == torch.uint8 for name in before)
    assert all(
        torch.equal(model.get_submodule(name).weight.quant_state.absmax, absmax) for name, absmax in states.items()
    )


@pytest.mark.parametrize("kind", ["quanto-int8", "torchao-int8"])
def test_a_base_whose_layers_return_their_weight_dtype_is_left_in_its_dtype_and_runs(folder: Path, kind) -> None:
    """optimum-quanto and torchao layers return bfloat16 here whatever their input: float32 norms around
    them would mix dtypes inside attention (peft skips torchao and fails on this quanto base)."""
    package = {"quanto-int8": "optimum.quanto", "torchao-int8": "torchao"}[kind]
    if not installed(package):
        pytest.skip(f"{package} is not installed (pip install deltatune[quantized])")
    model = load(folder, kind)
    before, expected = dtypes(model), model(**inputs()).logits
    assert deltatune.prepare_quantized_base(model) == []
    assert dtypes(model) == before
    assert torch.equal(model(**inputs()).logits, expected)


def test_a_base_without_quantized_layers_is_left_as_it_is(folder: Path) -> None:
    model = load(folder, None)
    before = dtypes(model)
    assert deltatune.prepare_quantized_base(model, gradient_checkpointing=True) == []
    assert dtypes(model) == before and not getattr(model, "_require_grads_hooks", None)


def reentrant_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every block reentrantly, without transformers' own input-gradient hook (the state
    transformers 4 left a base in: it hooked the embeddings only for peft-loaded models)."""
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint)


def lora_losses(model: torch.nn.Module) -> list[float]:
    """The losses of eight LoRA steps (all linear layers below the head) in training mode."""
    delta_model = deltatune.attach(model, deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    delta_model.train()
    optimizer = torch.optim.AdamW(delta_model.adapter_parameters("default"), lr=1e-2)
    batch, losses = inputs(1), []
    for _ in range(8):
        loss = delta_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_on_a_quantized_base_trains_only_after_the_preparation(folder: Path) -> None:
    unprepared = load(folder, "nf4", dtype=torch.float32)
    reentrant_checkpointing(unprepared)
    with pytest.raises(RuntimeError, match="does not require grad"):  # every adapter is inside a block
        lora_losses(unprepared)

    prepared = load(folder, "nf4", dtype=torch.float32)
    deltatune.prepare_quantized_base(prepared, gradient_checkpointing=True)
    reentrant_checkpointing(prepared)
    losses = lora_losses(prepared)
    assert losses[-1] < losses[0] - 1e-3


def lora_gradients(model: torch.nn.Module, evaluate_first: bool) -> dict[str, torch.Tensor]:
    """The LoRA factors' gradients of one training step, after one evaluation (eval mode, no gradients)
    or without it."""
    torch.manual_seed(0)
    config = deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    delta_model = deltatune.attach(model, config)
    if evaluate_first:
        with torch.no_grad():
            delta_model.eval()(**inputs())
    delta_model.train()
    batch = inputs(1)
    delta_model(**batch, labels=batch["input_ids"]).loss.backward()
    return {name: parameter.grad for name, parameter in delta_model.named_parameters() if parameter.requires_grad}


def test_after_an_evaluation_the_gradients_are_those_of_a_base_never_evaluated(folder: Path) -> None:
    expected = lora_gradients(load(folder, "nf4", dtype=torch.float32), evaluate_first=False)
    model = load(folder, "nf4", dtype=torch.float32)
    deltatune.prepare_quantized_base(model)
    gradients = lora_gradients(model, evaluate_first=True)
    assert len(gradients) == 28 and gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_attach_alone_keeps_a_4bit_base_in_the_layout_that_gives_gradients(folder) -> None:
    """Without the preparation too: on a CPU where bitsandbytes repacks a frozen 4-bit layer at its first
    evaluation (after which its backward passes nothing through its weights, so an adapter below it
    would train on the part of its gradient through the adapters above), `attach` has kept the layout."""
    model = load(folder, "nf4", dtype=torch.float32)
    if not all(
        getattr(module, "support_avx512bf16_for_cpu", False) for module in model.modules() if is_quantized(module)
    ):
        pytest.skip("bitsandbytes does not repack 4-bit layers on this CPU (no avx512-bf16)")
    expected = lora_gradients(load(folder, "nf4", dtype=torch.float32), evaluate_first=False)
    gradients = lora_gradients(model, evaluate_first=True)
    assert len(gradients) == 28 and gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=1e-5, msg=name)
