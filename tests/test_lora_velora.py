"""VeLoRA (`velora_config`, `methods/lora_velora.py`) against peft 0.21 with the same weights: a tiny
Llama's training loss, A's approximate and B's exact gradients and the projection vectors within 1e-5
for each `init_type`; what autograd keeps for the backward pass (the sub-token coefficients, never the
input); training from YAML; and the layers and options VeLoRA refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import deltatune
from resume_checks import assert_resume_equals_the_uninterrupted_run
from test_peft_crosscheck import assert_changed
from tiny_models import build, token_inputs
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
"""In features 32 and 64: with 3 groups, sub-tokens of 11 and 22 features, both zero-padded."""
INIT_TYPES = ["random", "batch_average", "batch_average_once"]


def velora(init_type: str, num_groups: int = 3, scale: float = 1.0) -> dict:
    return {"num_groups": num_groups, "init_type": init_type, "scale": scale}


def same_adapters(tmp_path: Path, init_type: str, dropout: float = 0.0) -> tuple[peft.PeftModel, deltatune.DeltaModel]:
    """A peft VeLoRA adapter with random A and B on a tiny Llama, and the same one loaded here, both training."""
    base = build("llama")
    options = {"init_lora_weights": False, "lora_dropout": dropout, "velora_config": velora(init_type, scale=0.5)}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS, **options))
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)
    return theirs.train(), ours.train()


def training_loss(model: nn.Module, seed: int) -> torch.Tensor:
    inputs = token_inputs(seed)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A" / ".lora_B": gradient}, in either library (peft's names lose `.default.weight`)."""
    found = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        module = name.split("layers.", 1)[1].split(".lora_")[0].split(".deltatune")[0]
        factor = "lora_A" if "lora_A" in name else "lora_B"
        found[f"{module}.{factor}"] = parameter.grad.clone()
        parameter.grad = None
    return found


def projections(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module: VeLoRA's projection vector v}, in either library."""
    found = {}
    for name, buffer in model.named_buffers():
        if "velora" in name:
            found[name.split("layers.", 1)[1].split(".lora_velora")[0].split(".deltatune")[0]] = buffer.float()
    return found


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected) and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=ATOL, rtol=0, msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_velora_loss_gradients_and_projection_equal_peft_over_two_steps(init_type: str, tmp_path: Path) -> None:
    """Two batches: "batch_average" takes v from each, "batch_average_once" keeps the first batch's."""
    theirs, ours = same_adapters(tmp_path, init_type)
    for seed in (1, 2):
        torch.testing.assert_close(training_loss(ours, seed), training_loss(theirs, seed), atol=ATOL, rtol=0)
        assert_all_close(gradients(ours), gradients(theirs))
        assert_all_close(projections(ours), projections(theirs))


def test_velora_with_dropout_draws_peft_masks_and_equals_peft(tmp_path: Path) -> None:
    """With dropout both libraries drop A's input with `F.dropout` in module order, so under one seed the
    masks, the projection vectors (taken from the dropped input) and the gradients agree."""
    theirs, ours = same_adapters(tmp_path, "batch_average", dropout=0.3)
    torch.manual_seed(5)
    expected = training_loss(theirs, 1)
    torch.manual_seed(5)
    torch.testing.assert_close(training_loss(ours, 1), expected, atol=ATOL, rtol=0)
    assert_all_close(gradients(ours), gradients(theirs))
    assert_all_close(projections(ours), projections(theirs))


def test_a_zero_batch_gives_peft_fallback_projection() -> None:
    """An all-zero batch has no mean direction: v is then the normalised ones vector, as in peft."""
    from peft.tuners.lora.velora import _normalize_projection

    from deltatune.methods.lora_velora import unit_vector

    for vector in (torch.zeros(5), torch.tensor([3.0, -4.0])):
        torch.testing.assert_close(unit_vector(vector), _normalize_projection(vector), atol=0, rtol=0)


def test_velora_gradient_of_a_is_an_approximation_and_that_of_b_is_exact(tmp_path: Path) -> None:
    """Against plain LoRA with the same weights: A's gradient differs (the compression is in effect), B's
    and the loss do not."""
    _, ours = same_adapters(tmp_path, "batch_average")
    plain = deltatune.load(build("llama"), str(tmp_path), trainable=True).train()
    plain.configs["default"].velora_config = None
    for _, site in plain.sites():
        for adapter in site.adapters.values():
            adapter.velora = None
    torch.testing.assert_close(training_loss(ours, 1), training_loss(plain, 1), atol=ATOL, rtol=0)
    approximate, exact = gradients(ours), gradients(plain)
    for name in exact:
        if name.endswith("lora_B"):
            torch.testing.assert_close(approximate[name], exact[name], atol=ATOL, rtol=0)
        else:
            assert_changed(approximate[name], exact[name])


def saved_bytes(run: callable, excluded: list[torch.Tensor]) -> tuple[int, set[int]]:
    """(bytes of the distinct storages autograd keeps for backward while `run()` records, the storages'
    addresses), leaving out those of `excluded` (parameters, kept anyway)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    for tensor in excluded:
        storages.pop(tensor.untyped_storage().data_ptr(), None)
    return sum(storages.values()), set(storages)


@pytest.mark.parametrize("x_needs_grad", [False, True], ids=["input-frozen", "input-needs-grad"])
def test_velora_backward_keeps_the_sub_token_coefficients_not_the_input(x_needs_grad: bool) -> None:
    """A Linear 96 → 40, rank 4, 3 groups of 32 features, 50 tokens: plain LoRA keeps x (50 × 96 floats) and
    x Aᵀ (50 × 4); VeLoRA keeps x Aᵀ, the coefficients (50 × 3) and v (32): 182 numbers in x's place of 4,800."""
    tokens, in_features, rank, groups = 50, 96, 4, 3
    kept = {}
    for name, settings in {"plain": None, "velora": velora("batch_average", num_groups=groups)}.items():
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(in_features, 40))
        model = deltatune.attach(layer, deltatune.LoraConfig(r=rank, target_modules=["0"], velora_config=settings))
        model.train()
        x = torch.randn(tokens, in_features, requires_grad=x_needs_grad)
        parameters = [parameter for parameter in layer.parameters()]
        kept[name] = saved_bytes(lambda model=model, x=x: model(x).sum(), parameters)
        assert (x.untyped_storage().data_ptr() in kept[name][1]) == (name == "plain")
    assert kept["plain"][0] == 4 * (tokens * in_features + tokens * rank)
    assert kept["velora"][0] == 4 * (tokens * rank + tokens * groups + in_features // groups)


def test_velora_outside_training_computes_plain_lora_and_keeps_the_input(tmp_path: Path) -> None:
    """In eval mode (or without autograd) the projection is LoRA's own: v does not move."""
    _, ours = same_adapters(tmp_path, "batch_average")
    ours.eval()
    before = projections(ours)
    ours(**token_inputs(1))
    assert_all_close(projections(ours), before)


def test_deltatune_train_with_velora_from_yaml_lowers_the_loss(tmp_path: Path) -> None:
    from deltatune.train.cli import main

    adapter = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    config = task_config(tmp_path, "causal-lm", method={**adapter, "velora_config": velora("batch_average_once")})
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["velora_config"] == velora("batch_average_once")


def test_a_velora_run_resumes_bit_exactly_with_its_first_batch_projection(tmp_path: Path) -> None:
    """ "batch_average_once": the checkpoint's v is kept on resume (peft would take it from the next batch)."""
    from resume_checks import RESUME_SETTINGS

    adapter = {**RESUME_SETTINGS["adapter"], "lora_dropout": 0.0, "velora_config": velora("batch_average_once")}
    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, "adapter": adapter})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": ["embed_tokens"]}, r"linear layers only, not of model.embed_tokens \(Embedding\)"),
        ({"target_modules": ["q_proj"], "use_dora": True}, r"velora_config and use_dora do not combine"),
        ({"target_parameters": ["q_proj.weight"]}, r"not to target_parameters"),
        ({"target_modules": ["q_proj"], "velora_config": {"groups": 2}}, r"velora_config has no groups"),
        ({"target_modules": ["q_proj"], "velora_config": {"num_groups": 0}}, r"velora_config.num_groups must be"),
    ],
    ids=["embedding", "dora", "target_parameters", "unknown-setting", "no-groups"],
)
def test_velora_refuses_what_it_does_not_compute_in_one_line(options: dict, message: str) -> None:
    config = {"velora_config": velora("random"), **options}
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, **config))
