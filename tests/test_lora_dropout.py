"""LoRA dropout: the mask drawn from 16-bit fields, replayed in backward from its seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import deltatune
from deltatune.methods.lora_dropout import DroppedProjection, drop_into, drop_threshold, kept_fraction
from tiny_models import build


def test_gradients_equal_an_explicit_mask() -> None:
    x = torch.randn(4, 9, 40, requires_grad=True)
    lora_A = torch.randn(6, 40, requires_grad=True)
    torch.manual_seed(3)
    hidden = DroppedProjection.apply(x, lora_A, drop_threshold(0.3))
    upstream = torch.randn_like(hidden)
    grad_x, grad_A = torch.autograd.grad(hidden, (x, lora_A), upstream)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 1 << 62, (1,)).item())
    keep = drop_into(x.detach(), seed, drop_threshold(0.3))[0].float()
    x_ref, a_ref = x.detach().clone().requires_grad_(), lora_A.detach().clone().requires_grad_()
    reference = F.linear(x_ref * keep, a_ref)
    ref_x, ref_A = torch.autograd.grad(reference, (x_ref, a_ref), upstream)
    torch.testing.assert_close(hidden, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_x, ref_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_A, ref_A, atol=1e-5, rtol=1e-6)


def test_drop_rate_matches_the_probability() -> None:
    x = torch.ones(256, 1024)
    keep, kept = drop_into(x, seed=7, threshold=drop_threshold(0.05))
    assert abs(1 - keep.float().mean().item() - 0.05) < 0.003
    assert abs(kept_fraction(0.05) - 0.95) < 1 / 65536
    assert torch.equal(kept, x * keep)


def test_masks_differ_between_calls_and_repeat_under_a_seed() -> None:
    x, lora_A = torch.ones(2, 64, 32), torch.ones(1, 32)
    first, second = DroppedProjection.apply(x, lora_A, drop_threshold(0.5)), DroppedProjection.apply(x, lora_A, drop_threshold(0.5))
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    again = DroppedProjection.apply(x, lora_A, drop_threshold(0.5))
    torch.manual_seed(11)
    assert torch.equal(again, DroppedProjection.apply(x, lora_A, drop_threshold(0.5)))


def _gradients(checkpointing: bool) -> list[torch.Tensor]:
    delta_model = deltatune.attach(build("llama").train(), deltatune.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False))
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
