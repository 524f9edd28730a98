"""The invariant table's checks (test_invariants.py) for the methods beside LoRA on a 4-bit base: a tiny
Llama whose linear layers are bitsandbytes nf4 (`llama-nf4` in tiny_models.py). Each method of
`METHODS` below trains (the loss falls) with the base's stored tensors, packed 4-bit storage
included, bit-identical; save → load gives equal outputs; the output equals the base at init where the method
starts at zero, with the adapter disabled, and after unload; mixed batches equal separate runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import deltatune
import test_invariants as invariants
from test_invariants import CASES, Case
from tiny_models import build, run

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="bitsandbytes is not installed (pip install deltatune[quantized])",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]

ARCH = "llama-nf4"
METHODS: dict[str, Case] = {
    "adalora": CASES["adalora"],
    "bottleneck-houlsby": CASES["bottleneck"],
    "bottleneck-pfeiffer": Case(
        lambda arch: deltatune.BottleneckConfig(preset="pfeiffer", init_weights="zero_up"), mergeable=False
    ),
    "compacter": CASES["compacter"],
    "bitfit": CASES["bitfit"],
    "vera": CASES["vera"],
    "lora-monteclora": CASES["lora-monteclora"],
    "ia3": CASES["ia3"],
    "ln_tuning": CASES["ln_tuning"],
    "oft": CASES["oft"],
    "prompt_tuning": CASES["prompt_tuning"],
    "p_tuning": CASES["p_tuning"],
    "prefix_tuning": CASES["prefix_tuning"],
    "mam": CASES["mam"],
    "reft": CASES["reft"],
    "trainable_tokens": CASES["trainable_tokens"],
    "lora-bias-tokens": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, target_modules="all-linear", lora_bias=True, bias="all", trainable_token_indices=invariants.TOKENS
        ),
        mergeable=False,
        zero_init=False,
    ),
}
ZERO_INIT = [method for method, case in METHODS.items() if case.zero_init]


@pytest.fixture(autouse=True)
def table_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariant checks look their method up in the table by name: these rows join it."""
    for method, case in METHODS.items():
        monkeypatch.setitem(CASES, method, case)


def quantized_storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.data.clone()
        for name, module in model.named_modules()
        if "Linear4bit" in type(module).__name__
    }


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_falls_and_the_packed_base_stays_bit_identical(method: str) -> None:
    delta_model = deltatune.attach(build(ARCH), METHODS[method].config(ARCH))
    packed = quantized_storage(delta_model.base_model)
    assert len(packed) == 14 and all(tensor.dtype == torch.uint8 for tensor in packed.values())
    delta_model.train()
    optimizer = torch.optim.AdamW(delta_model.adapter_parameters("default"), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 96, (4, 8), generator=generator)
    losses = []
    for _ in range(8):
        loss = delta_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-2, losses
    after = quantized_storage(delta_model.base_model)
    assert all(torch.equal(packed[name], after[name]) for name in packed)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train_and_base_stays_bit_identical(method: str) -> None:
    invariants.test_only_adapter_parameters_train_and_base_stays_bit_identical(method, ARCH)


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_gives_equal_outputs(method: str, tmp_path) -> None:
    invariants.test_save_then_load_gives_equal_outputs(method, ARCH, tmp_path)


@pytest.mark.parametrize("method", ZERO_INIT)
def test_output_equals_base_at_init(method: str) -> None:
    invariants.test_output_equals_base_at_init(method, ARCH)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_equals_base(method: str) -> None:
    invariants.test_disabled_equals_base(method, ARCH)


@pytest.mark.parametrize("method", METHODS)
def test_unload_restores_the_base_exactly(method: str) -> None:
    invariants.test_unload_restores_the_base_exactly(method, ARCH)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_rows_equal_separate_runs(method: str) -> None:
    invariants.test_mixed_batch_rows_equal_separate_runs(method, ARCH)


def test_the_rows_run_on_a_4bit_base() -> None:
    model = build(ARCH)
    assert run(model, ARCH).shape == (3, 7, 96)
    assert {type(module).__name__ for module in model.modules()} >= {"Linear4bit"}
