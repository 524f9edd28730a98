"""MonteCLoRA (`monteclora_config`, `methods/lora_monteclora.py`) against peft 0.21 on a tiny Llama with the
same weights: eval outputs both ways (plain LoRA) within 1e-5; in training, with the same draws handed to
both libraries (peft's noise buffer and deltatune's generator cannot be aligned by a seed), the output,
the regulariser (`monteclora_loss` against `_get_monteclora_loss`), every gradient and the sampled
buffers; the draws' distribution against peft's Wishart sampler; merging; `deltatune train` (the loss
falls, the regulariser is added, a resume is bit-exact) and the options MonteCLoRA refuses."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from torch.distributions import Wishart

import deltatune
from deltatune.methods.lora_monteclora import Draws, MontecloraConfig, MontecloraSampler
from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
from test_peft_crosscheck import assert_changed
from tiny_models import build, token_inputs
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
"""In features 32, 32 and 64."""
SETTINGS = {"num_samples": 3, "sample_scaler": 0.05, "kl_loss_weight": 0.01, "use_entropy": True}
"""Noise of the size of A's entries, and every regulariser term weighing in."""


def peft_adapter(tmp_path: Path, **settings) -> tuple[nn.Module, peft.PeftModel]:
    """A peft MonteCLoRA adapter with random A, B and priors on a tiny Llama, saved in `tmp_path`."""
    base = build("llama")
    config = peft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights=False, monteclora_config={**SETTINGS, **settings}
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "prior" in name:
                parameter.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path)
    return base, theirs


def same_adapters(tmp_path: Path) -> tuple[peft.PeftModel, deltatune.DeltaModel]:
    base, theirs = peft_adapter(tmp_path)
    return theirs, deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)


def layer_name(name: str) -> str:
    """The adapted module's path in the base model, from a tensor name of either library."""
    if ".deltatune." in name:  # deltatune: base_model.<path>.deltatune.adapters.<adapter>.<tensor>
        return name.removeprefix("base_model.").split(".deltatune.")[0]
    return name.removeprefix("base_model.model.").split(".lora_")[0]  # peft: base_model.model.<path>.lora_…


def tensor_name(name: str) -> str:
    """lora_A, lora_B, or the sampler tensor's own name, from a tensor name of either library."""
    parts = name.split(".")
    return parts[-3] if parts[-1] == "weight" else parts[-1]


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            found[f"{layer_name(name)}.{tensor_name(name)}"] = parameter.grad.clone()
            parameter.grad = None
    return found


def sampled_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer.gaussian_var_prior / layer.expert_weights: value}, in either library."""
    return {
        f"{layer_name(name)}.{tensor_name(name)}": buffer.detach().clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("gaussian_var_prior", "expert_weights"))
    }


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected) and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=ATOL, rtol=1e-4, msg=lambda message: f"{name}: {message}")


def hand_the_same_draws(theirs: peft.PeftModel, ours: deltatune.DeltaModel, seed: int) -> None:
    """Give each layer of both libraries the same draws for its next training call: peft's sampler its full
    Wishart(df = r, I) matrix, deltatune's sampler its diagonal (all that the math reads)."""
    generator = torch.Generator().manual_seed(seed)
    ours_by_layer = {name: site.adapters["default"].monteclora for name, site in ours.sites()}
    for name, module in theirs.named_modules():
        if not hasattr(module, "lora_monteclora_sampler"):
            continue
        sampler = module.lora_monteclora_sampler["default"]
        count, rank, in_features = sampler.num_samples, sampler.out_features, sampler.in_features
        standard = torch.randn(count, in_features, rank, generator=generator)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            wishart = Wishart(df=torch.tensor(float(rank)), scale_tril=torch.eye(rank)).sample()
        mixture = torch.randn(count, generator=generator)
        sampler.sampler.get = lambda z=standard, w=wishart, u=mixture: {"z_mvn": z, "z_wishart": w, "z_dirichlet": u}
        draws = Draws(standard.transpose(1, 2), wishart.diagonal(), mixture)
        ours_by_layer[layer_name(name)].draw = lambda lora_A, draws=draws: draws


def training_loss(model: nn.Module, regularizer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the task loss plus the regulariser, the logits) of one training call, after its backward pass."""
    inputs = token_inputs(seed)
    output = model(**inputs, labels=inputs["input_ids"])
    loss = output.loss + regularizer()
    loss.backward()
    return loss.detach(), output.logits.detach()


# ----------------------------------------------------------------------------- against peft
def test_monteclora_eval_outputs_equal_peft_both_ways(tmp_path: Path) -> None:
    """Outside training MonteCLoRA is plain LoRA; the priors and sampled buffers travel in both folders."""
    base, theirs = peft_adapter(tmp_path / "peft")
    inputs = token_inputs(1)
    expected = theirs.eval()(**inputs).logits
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert_changed(expected, base(**inputs).logits)
    torch.testing.assert_close(ours(**inputs).logits, expected, atol=ATOL, rtol=0)
    ours.save(str(tmp_path / "ours"), format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(again(**inputs).logits, expected, atol=ATOL, rtol=0)
    priors = {name: tensor for name, tensor in again.state_dict().items() if "monteclora" in name}
    assert len(priors) == 4 * 2 * len(TARGETS)
    torch.testing.assert_close(priors, {name: theirs.state_dict()[name] for name in priors}, atol=0, rtol=0)


def test_monteclora_training_output_regulariser_gradients_and_buffers_equal_peft_for_the_same_draws(
    tmp_path: Path,
) -> None:
    """Two training calls, each with fresh draws, with the regulariser added to the task loss."""
    theirs, ours = same_adapters(tmp_path)
    theirs.train()
    ours.train()
    for seed in (1, 2):
        hand_the_same_draws(theirs, ours, seed)
        expected, their_logits = training_loss(theirs, theirs.base_model._get_monteclora_loss, seed)
        actual, our_logits = training_loss(ours, lambda: deltatune.monteclora_loss(ours), seed)
        torch.testing.assert_close(our_logits, their_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
        assert_all_close(gradients(ours), gradients(theirs))
        assert_all_close(sampled_buffers(ours), sampled_buffers(theirs))
    with torch.no_grad():
        assert_changed(our_logits, ours.eval()(**token_inputs(2)).logits)


def test_monteclora_regulariser_equals_peft_from_loaded_buffers_and_is_zero_outside_training(tmp_path: Path) -> None:
    """Before its first training call a loaded adapter's regulariser reads the sampled buffers of the file."""
    _, theirs = peft_adapter(tmp_path / "before")
    theirs.train()(**token_inputs(3))  # peft's own draws
    theirs.save_pretrained(tmp_path / "after")
    ours = deltatune.load(build("llama"), str(tmp_path / "after"), trainable=True).train()
    expected = theirs.base_model._get_monteclora_loss()
    assert expected > 1e-3
    torch.testing.assert_close(deltatune.monteclora_loss(ours), expected, atol=ATOL, rtol=1e-5)
    assert deltatune.monteclora_loss(ours.eval()).item() == 0.0
    plain = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"])).train()
    assert deltatune.monteclora_loss(plain).item() == 0.0


def test_monteclora_draws_follow_peft_distribution() -> None:
    """The diagonal deltatune draws (row norms² of an r × r standard normal X, X Xᵀ ~ Wishart(r, I)) has the
    moments of the diagonal of peft's Bartlett draws: χ²(r) entries (mean r, variance 2r), uncorrelated."""
    rank, count = 4, 20000
    sampler = MontecloraSampler(torch.zeros(rank, 1), MontecloraConfig(num_samples=1))
    torch.manual_seed(0)
    ours = torch.stack([sampler.draw(torch.zeros(rank, 1)).wishart_diagonal for _ in range(count)])
    theirs = (
        Wishart(df=torch.tensor(float(rank)), scale_tril=torch.eye(rank)).sample((count,)).diagonal(dim1=-2, dim2=-1)
    )
    for draws in (ours, theirs):
        torch.testing.assert_close(draws.mean(0), torch.full((rank,), float(rank)), atol=0.1, rtol=0)
        torch.testing.assert_close(draws.var(0), torch.full((rank,), 2.0 * rank), atol=0.6, rtol=0)
        correlation = torch.corrcoef(draws.t())
        torch.testing.assert_close(correlation, torch.eye(rank), atol=0.05, rtol=0)


def test_monteclora_noise_comes_from_the_seeded_default_generator(tmp_path: Path) -> None:
    _, ours = same_adapters(tmp_path)
    ours.train()
    inputs = token_inputs(1)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(ours(**inputs).logits)
    assert torch.equal(outputs[0], outputs[1])
    assert_changed(outputs[2], outputs[0])


def test_monteclora_under_gradient_checkpointing_recomputes_the_same_draws(tmp_path: Path) -> None:
    """Backward recomputes each layer's forward: the noise must be drawn again as it was (the checkpoint keeps the
    generator's state), so the gradients and the regulariser equal those of a run that keeps its activations."""
    _, kept = same_adapters(tmp_path)
    recomputed = copy.deepcopy(kept)
    recomputed.gradient_checkpointing_enable()
    results = []
    for model in (kept, recomputed):
        torch.manual_seed(7)
        loss, _ = training_loss(model.train(), lambda model=model: deltatune.monteclora_loss(model), 1)
        results.append((loss, gradients(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL, rtol=0)
    assert_all_close(results[1][1], results[0][1])


def test_a_monteclora_model_deep_copies_after_a_training_call(tmp_path: Path) -> None:
    """The latest call's draws (held for the regulariser, with their graph) stay with the original."""
    _, ours = same_adapters(tmp_path)
    ours.train()(**token_inputs(1))
    copied = copy.deepcopy(ours)
    assert deltatune.monteclora_loss(ours) > 0
    torch.testing.assert_close(copied.eval()(**token_inputs(2)).logits, ours.eval()(**token_inputs(2)).logits)


def test_monteclora_merges_plain_lora_even_in_training_mode(tmp_path: Path) -> None:
    """ΔW = s·B A without noise: the merged weights equal peft's `merge_and_unload`."""
    theirs, ours = same_adapters(tmp_path)
    inputs = token_inputs(1)
    with torch.no_grad():
        expected = ours.eval()(**inputs).logits
        ours.train().merge()
        torch.testing.assert_close(ours.eval()(**inputs).logits, expected, atol=ATOL, rtol=0)
    merged = dict(ours.unload(merge=True).named_parameters())
    for name, parameter in theirs.merge_and_unload().named_parameters():
        torch.testing.assert_close(merged[name], parameter, atol=ATOL, rtol=0)


def test_a_pissa_monteclora_adapter_converts_to_the_plain_lora_of_its_eval_function() -> None:
    """`to_plain_lora` serves the adapter as it computes outside training: a plain rank-2r LoRA, no sampler."""
    ours = deltatune.attach(
        build("llama"),
        deltatune.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="pissa", monteclora_config=SETTINGS),
    )
    with torch.no_grad():
        for parameter in ours.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    expected = ours.eval()(**token_inputs(1)).logits
    deltatune.to_plain_lora(ours, "default", "plain")
    ours.activate("plain")
    assert ours.configs["plain"].monteclora_config is None
    torch.testing.assert_close(ours(**token_inputs(1)).logits, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- deltatune train
MONTECLORA = {"num_samples": 2, "sample_scaler": 0.01, "kl_loss_weight": 0.001}


def test_deltatune_train_with_monteclora_from_yaml_lowers_the_loss(tmp_path: Path) -> None:
    from deltatune.train.cli import main

    adapter = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    config = task_config(tmp_path, "causal-lm", method={**adapter, "monteclora_config": MONTECLORA})
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["monteclora_config"] == {**dataclasses.asdict(MontecloraConfig()), **MONTECLORA}


def test_deltatune_train_adds_the_regulariser_of_monteclora_adapters_only() -> None:
    from deltatune.train.step_hooks import extra_loss, step_hooks

    model = build("llama")
    ours = deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules=["q_proj"], monteclora_config=SETTINGS))
    ours.add("plain", deltatune.LoraConfig(r=4, target_modules=["v_proj"]))
    ours.activate("default", "plain")
    ours.train()(**token_inputs(1))
    hooks = step_hooks(ours, total_steps=4)
    assert list(hooks) == ["default"]
    expected = deltatune.monteclora_loss(ours, "default")
    assert expected > 1e-3
    assert torch.equal(extra_loss(hooks), expected)


def test_a_monteclora_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """The noise comes from the generator whose state the checkpoint keeps; the sampler needs no step state."""
    adapter = {**RESUME_SETTINGS["adapter"], "monteclora_config": MONTECLORA}
    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, "adapter": adapter})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


# ----------------------------------------------------------------------------- settings
def test_monteclora_settings_written_as_yaml_text_are_read_as_numbers() -> None:
    """YAML reads `1e-5` (no dot) as text."""
    config = deltatune.LoraConfig(monteclora_config={"kl_loss_weight": "1e-5", "sample_scaler": "2e-4"})
    assert config.monteclora_config == MontecloraConfig(kl_loss_weight=1e-5, sample_scaler=2e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": ["embed_tokens"]}, r"linear layers only, not of model.embed_tokens \(Embedding\)"),
        ({"target_modules": ["q_proj"], "use_dora": True}, r"monteclora_config does not combine with use_dora"),
        ({"target_modules": ["q_proj"], "velora_config": {}}, r"does not combine with velora_config"),
        (
            {"target_modules": ["q_proj"], "init_lora_weights": "mica"},
            r"does not combine with init_lora_weights='mica'",
        ),
        ({"target_parameters": ["q_proj.weight"]}, r"not to target_parameters"),
        ({"target_modules": ["q_proj"], "monteclora_config": {"samples": 2}}, r"monteclora_config has no samples"),
        ({"target_modules": ["q_proj"], "monteclora_config": {"num_samples": 0}}, r"monteclora_config.num_samples"),
        ({"target_modules": ["q_proj"], "monteclora_config": {"dirichlet_prior": 0}}, r"dirichlet_prior must be"),
    ],
    ids=["embedding", "dora", "velora", "mica", "target_parameters", "unknown-setting", "no-samples", "zero-prior"],
)
def test_monteclora_refuses_what_it_does_not_compute_in_one_line(options: dict, message: str) -> None:
    config = {"monteclora_config": {"num_samples": 2}, **options}
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, **config))


class TwoExperts(nn.Module):
    """Two linears, the second of which a call may skip (an MoE expert no token is routed to)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, inputs: torch.Tensor, use_second: bool = True) -> torch.Tensor:
        out = self.first(inputs)
        return out + self.second(inputs) if use_second else out


def test_the_monteclora_regulariser_of_a_layer_a_step_did_not_reach_is_its_last_call_value_without_a_graph() -> None:
    """A step whose forward skips a layer backpropagates (no graph of an earlier, freed forward is reused);
    the skipped layer still counts with its last call's σ² and w, as peft's stale values, and the layers
    the step did reach get their gradients."""
    torch.manual_seed(0)
    config = deltatune.LoraConfig(r=2, target_modules=["first", "second"], monteclora_config=SETTINGS)
    model = deltatune.attach(TwoExperts(), config).train()
    samplers = {name: site.adapters["default"].monteclora for name, site in model.sites()}
    skipped = next(sampler for name, sampler in samplers.items() if name.endswith("second"))
    (model(torch.randn(4, 8)).pow(2).mean() + deltatune.monteclora_loss(model)).backward()
    before = float(skipped.regularizer())  # its buffers: the first call's σ² and w (no parameter changed since)
    model.zero_grad()
    out = model(torch.randn(4, 8), use_second=False)
    terms = {name: sampler.regularizer() for name, sampler in samplers.items()}
    (out.pow(2).mean() + torch.stack(list(terms.values())).mean()).backward()
    assert float(next(term for name, term in terms.items() if name.endswith("second"))) == pytest.approx(before)
    reached = next(sampler for name, sampler in samplers.items() if name.endswith("first"))
    assert reached.std_prior.grad is not None and reached.expert_weights_prior.grad.abs().sum() > 0
