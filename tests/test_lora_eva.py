"""EVA (`deltatune.initialize_from_data` with init_lora_weights="eva"): A from the principal
directions of each layer's inputs, ranks redistributed by explained variance. Checked against the
plain computation (every kept input row stacked, centred, `torch.linalg.svd`) and against peft 0.21's
`initialize_lora_eva_weights` on the same batches; trained through `deltatune train`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora.eva import initialize_lora_eva_weights

import deltatune
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q_proj", "o_proj", "down_proj"]  # each sees its own input (q, k and v share one)


def token_batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches with right padding and prompt positions labelled -100."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(3, 96, (4, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 8:] = 0
        attention_mask[3, 5:] = 0
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :3] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def eva_config(rho: float = 2.0, targets=TARGETS, **settings) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="eva", eva_config={"rho": rho, **settings}
    )


def reference_directions(model: torch.nn.Module, layer: str, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-singular vectors, explained-variance ratios) of the layer's kept input rows, stacked and
    centred: the plain computation, in float64, signs by peft's rule."""
    rows: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, output: rows.append(args[0]))
    kept = []
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            kept.append(rows.pop()[(batch["attention_mask"] == 1) & (batch["labels"] != -100)])
    handle.remove()
    data = torch.cat(kept).double()
    _, values, right_t = torch.linalg.svd(data - data.mean(0), full_matrices=False)
    signs = torch.sign(right_t[torch.arange(right_t.shape[0]), right_t.abs().argmax(1)])
    return right_t * signs[:, None], values.square() / values.square().sum()


def factors(delta_model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {name: site.adapters["default"].lora_A.detach() for name, site in delta_model.sites()}


def test_a_is_the_top_principal_directions_of_the_layer_inputs_and_the_model_starts_at_the_base() -> None:
    base, batches = build("llama"), token_batches()
    delta_model = deltatune.attach(copy.deepcopy(base), eva_config(rho=1.0))
    deltatune.initialize_from_data(delta_model, batches)
    for layer, lora_A in factors(delta_model).items():
        directions, _ = reference_directions(base, layer, batches)
        torch.testing.assert_close(lora_A.double(), directions[:4], atol=1e-5, rtol=0, msg=layer)
    assert torch.equal(run(delta_model, "llama"), run(base, "llama"))


def test_the_rank_budget_goes_to_the_largest_explained_variance_ratios() -> None:
    """Σ r over the layers goes to the largest ratios, at most round(r·rho) per layer; alpha follows
    the rank. The reference counts, per layer, its capped ratios at or above the budget-th largest."""
    base, batches = build("llama"), token_batches()
    delta_model = deltatune.attach(copy.deepcopy(base), eva_config(rho=1.5))
    deltatune.initialize_from_data(delta_model, batches)
    layers = [name for name, _ in base.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    capped = {layer: reference_directions(base, layer, batches)[1][:6] for layer in layers}
    threshold = torch.cat(list(capped.values())).sort(descending=True).values[4 * len(layers) - 1]
    expected = {layer: int((ratios >= threshold).sum()) for layer, ratios in capped.items()}
    assert sum(expected.values()) == 4 * len(layers) and len(set(expected.values())) > 1
    config = delta_model.configs["default"]
    kept = {layer: rank for layer, rank in expected.items() if rank > 0}
    assert sorted(delta_model.targets["default"]) == sorted(kept)
    assert {layer: config.rank_for(layer) for layer in kept} == kept
    assert {layer: config.alpha_for(layer) for layer in kept} == {layer: 2.0 * rank for layer, rank in kept.items()}
    for layer, lora_A in factors(delta_model).items():
        torch.testing.assert_close(
            lora_A.double(), reference_directions(base, layer, batches)[0][: kept[layer]], atol=1e-5, rtol=0
        )


def planted_batches() -> list[dict[str, torch.Tensor]]:
    """Inputs of the plain MLP with a planted spectrum (σ_i = 4·2^-i in random directions, offset 0.3),
    so that the principal directions are well separated and peft's iteration settles on them."""
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    scales = 4 * 2.0 ** -torch.arange(16.0)
    return [{"x": (torch.randn(64, 16, generator=generator) * scales) @ rotation.T + 0.3} for _ in range(4)]


def test_the_ranks_and_directions_agree_with_peft_eva_on_the_same_batches() -> None:
    """peft's EVA estimates the components with an incremental, randomized PCA that keeps round(r·rho)
    directions between batches and cycles the batches until consecutive estimates agree to a cosine of
    tau; ours is the exact eigendecomposition that iteration approaches. With rho=2, tau=0.9999 and a
    well-separated spectrum, measured: the same ranks, A equal to 1e-7 at the first layer (its input is
    the planted data) and to 3.3e-4 at the second (after a ReLU, a flatter spectrum); bound: 1e-3."""
    base, batches = build("mlp"), planted_batches()
    targets = ["net.0", "net.2"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights="eva",
            eva_config=peft.EvaConfig(rho=2.0, tau=0.9999),
        ),
    )
    initialize_lora_eva_weights(
        theirs, batches, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False
    )
    ours = deltatune.attach(copy.deepcopy(base), eva_config(targets=targets))
    deltatune.initialize_from_data(ours, batches)
    their_config, our_config = theirs.peft_config["default"], ours.configs["default"]
    for layer, lora_A in factors(ours).items():
        assert our_config.rank_for(layer) == their_config.rank_pattern.get(layer, their_config.r)
        assert our_config.alpha_for(layer) == their_config.alpha_pattern.get(layer, their_config.lora_alpha)
        expected = theirs.base_model.model.get_submodule(layer).lora_A["default"].weight
        torch.testing.assert_close(lora_A, expected, atol=1e-3, rtol=0, msg=layer)


def test_an_eva_adapter_saved_for_peft_loads_there_with_our_outputs(tmp_path: Path) -> None:
    base = build("llama")
    delta_model = deltatune.attach(copy.deepcopy(base), eva_config())
    deltatune.initialize_from_data(delta_model, token_batches())
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    delta_model.save(str(tmp_path), format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, "llama"), run(delta_model.eval(), "llama"), atol=1e-5, rtol=0)


def test_a_peft_eva_adapter_with_redistributed_ranks_loads_with_peft_outputs(tmp_path: Path) -> None:
    base = build("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig()
        ),
    )
    initialize_lora_eva_weights(theirs, token_batches(), show_progress_bar=False)
    assert theirs.peft_config["default"].rank_pattern, "peft redistributed the ranks"
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    theirs.save_pretrained(str(tmp_path))
    loaded = deltatune.load(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(run(loaded, "llama"), run(theirs.eval(), "llama"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eva_config": {"tau": 0.9}}, r"eva_config has no tau"),
        ({"eva_config": {"rho": 0.5}}, r"eva_config needs rho ≥ 1"),
        ({"eva_config": {"batches": 0}}, r"eva_config\.batches must be a whole number ≥ 1, got 0"),
    ],
)
def test_bad_eva_settings_are_refused_in_one_line(options: dict, message: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.LoraConfig(init_lora_weights="eva", **options)


def test_only_an_eva_adapter_starts_from_data() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(deltatune.DeltaTuneError, match=r"init_lora_weights 'eva' or 'corda'; 'default' has True"):
        deltatune.initialize_from_data(delta_model, token_batches())


# ----------------------------------------------------------------------------- deltatune train
EVA_ADAPTER = {
    "method": "lora",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": "all-linear",
    "init_lora_weights": "eva",
    "eva_config": {"rho": 2.0, "batches": 2},
}


def test_deltatune_train_starts_eva_from_its_first_batches_and_the_loss_falls(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train
    from training_fixtures import task_config

    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=EVA_ADAPTER))
    result = train(config, progress=False)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
    saved = deltatune.load(AutoModelForCausalLM.from_pretrained(config.model), str(tmp_path / "out" / "adapter"))
    ranks = {saved.configs["default"].rank_for(layer) for layer in saved.targets["default"]}
    assert ranks != {4}, "the ranks were redistributed from the data"
    assert result.run.delta_model.configs["default"].rank_pattern == saved.configs["default"].rank_pattern


def test_an_eva_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """The resumed run starts EVA again on the same first batches: the same shapes, then the checkpoint."""
    from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
    from training_fixtures import task_config

    settings = {**RESUME_SETTINGS, "adapter": EVA_ADAPTER}
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **settings), tmp_path)
