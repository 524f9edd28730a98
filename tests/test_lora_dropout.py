"""LoRA dropout on CPU: the dropped positions drawn as geometric gaps, their terms subtracted; the
scratch memory it works in is shared by the modules of a model and freed with the model."""

from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.methods import lora_dropout
from deltatune.methods.lora_dropout import DroppedProjection, dropped_positions
from tiny_models import build


def _explicit_mask(shape: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(math.prod(shape))
    mask[positions] = 0
    return mask.view(shape)


@pytest.mark.parametrize("probability", [0.05, 0.2])
def test_output_and_gradients_equal_an_explicit_mask(probability: float) -> None:
    x = torch.randn(4, 9, 40, requires_grad=True)
    lora_A = torch.randn(6, 40, requires_grad=True)
    torch.manual_seed(3)
    hidden = DroppedProjection.apply(x, lora_A, probability)
    upstream = torch.randn_like(hidden)
    grad_x, grad_A = torch.autograd.grad(hidden, (x, lora_A), upstream)
    torch.manual_seed(3)
    mask = _explicit_mask(x.shape, dropped_positions(x.numel(), probability, x.device))
    assert 0 < (mask == 0).sum() < x.numel()
    x_ref, a_ref = x.detach().clone().requires_grad_(), lora_A.detach().clone().requires_grad_()
    reference = F.linear(x_ref * mask, a_ref)
    ref_x, ref_A = torch.autograd.grad(reference, (x_ref, a_ref), upstream)
    torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, ref_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_A, ref_A, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("probability", [0.001, 0.05, 0.5])
def test_drop_rate_and_gaps_follow_bernoulli(probability: float) -> None:
    count = 2_000_000
    torch.manual_seed(7)
    positions = dropped_positions(count, probability, torch.device("cpu"))
    assert positions.min() >= 0 and positions.max() < count
    assert torch.all(positions[1:] > positions[:-1])
    rate, spread = positions.numel() / count, math.sqrt(probability * (1 - probability) / count)
    assert abs(rate - probability) < 5 * spread
    gaps = torch.diff(positions).float()  # geometric(p): mean 1/p, P(gap = 1) = p
    assert abs(gaps.mean().item() * probability - 1) < 0.03
    assert abs((gaps == 1).float().mean().item() - probability) < 5 * math.sqrt(probability / gaps.numel()) + 1e-3


def test_positions_cover_the_whole_range() -> None:
    torch.manual_seed(0)
    positions = dropped_positions(10_000, 0.5, torch.device("cpu"))
    assert positions[-1] > 9_900 and positions.numel() > 4_500


def test_masks_differ_between_calls_and_repeat_under_a_seed() -> None:
    x, lora_A = torch.ones(2, 64, 32), torch.ones(1, 32)
    first, second = DroppedProjection.apply(x, lora_A, 0.2), DroppedProjection.apply(x, lora_A, 0.2)
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    again = DroppedProjection.apply(x, lora_A, 0.2)
    torch.manual_seed(11)
    assert torch.equal(again, DroppedProjection.apply(x, lora_A, 0.2))


def test_large_probabilities_use_a_dense_mask() -> None:
    delta_model = deltatune.attach(
        build("llama").train(),
        deltatune.LoraConfig(r=4, lora_dropout=0.7, target_modules="all-linear", init_lora_weights=False),
    )
    inputs = torch.randint(3, 96, (2, 10))
    torch.manual_seed(0)
    first = delta_model(input_ids=inputs).logits
    torch.manual_seed(0)
    assert torch.equal(first, delta_model(input_ids=inputs).logits)
    assert not torch.equal(first, delta_model(input_ids=inputs).logits)


def _gradients(checkpointing: bool) -> list[torch.Tensor]:
    delta_model = deltatune.attach(
        build("llama").train(),
        deltatune.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False),
    )
    if checkpointing:
        delta_model.gradient_checkpointing_enable()
    inputs = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    delta_model(input_ids=inputs, labels=inputs).loss.backward()
    return [p.grad.clone() for p in delta_model.parameters() if p.requires_grad]


def test_gradient_checkpointing_replays_the_same_masks() -> None:
    for plain, checkpointed in zip(_gradients(False), _gradients(True)):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


def test_dropout_is_off_in_eval_mode() -> None:
    config = deltatune.LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False)
    delta_model = deltatune.attach(build("llama"), config)
    inputs = torch.randint(3, 96, (2, 10))
    assert torch.equal(delta_model(input_ids=inputs).logits, delta_model(input_ids=inputs).logits)


@pytest.mark.parametrize("probability", [0.05, 0.7])
def test_kept_terms_are_rescaled_so_the_mean_is_unchanged(probability: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1, bias=False))
    torch.nn.init.zeros_(model[0].weight)
    delta_model = deltatune.attach(
        model, deltatune.LoraConfig(r=1, lora_alpha=1, lora_dropout=probability, target_modules=["0"])
    )
    adapter = model[0].deltatune.adapters["default"]
    with torch.no_grad():
        adapter.lora_A.fill_(1.0)
        adapter.lora_B.fill_(1.0)
    delta_model.train()
    output = delta_model(torch.ones(4000, 1000))
    assert abs(output.mean().item() / 1000 - 1) < 0.005
    assert output.std().item() > 1


@pytest.fixture
def scratch_buffers(monkeypatch) -> list[weakref.ref]:
    """Weak references to every buffer `lora_dropout` allocates while the test runs."""
    made, allocate = [], torch.empty_like

    def recorded(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == lora_dropout.__name__:
            made.append(weakref.ref(tensor))
        return tensor

    gc.collect()  # models of earlier tests, and the buffers they hold, are gone
    monkeypatch.setattr(torch, "empty_like", recorded)
    return made


def _train_step(delta_model: deltatune.DeltaModel) -> None:
    inputs = torch.randint(3, 96, (3, 7))
    delta_model(input_ids=inputs, labels=inputs).loss.backward()


def test_dropout_scratch_is_shared_by_the_modules_and_steps_of_a_model(scratch_buffers) -> None:
    delta_model = deltatune.attach(
        build("llama").train(), deltatune.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear")
    )
    _train_step(delta_model)
    _train_step(delta_model)
    # one buffer per input width (the hidden size, 32, and the MLP's, 64), not one per module or call
    assert len(scratch_buffers) == 2 and all(ref() is not None for ref in scratch_buffers)


def test_dropout_scratch_memory_is_freed_with_the_model(scratch_buffers) -> None:
    delta_model = deltatune.attach(
        build("llama").train(), deltatune.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear")
    )
    _train_step(delta_model)
    assert scratch_buffers and all(ref() is not None for ref in scratch_buffers)
    del delta_model
    gc.collect()
    assert all(ref() is None for ref in scratch_buffers)
