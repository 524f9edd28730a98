"""ReFT against references that need no AdapterHub: torch's orthogonal parametrization, the paper's
equation written out with plain hooks, and each padded row run alone; the refusals, the AdapterHub
layout read back here, and training through `deltatune train` (the AdapterHub cross-check is
test_reft_adapterhub.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import deltatune
from deltatune.errors import AdapterFileError, DeltaTuneError, MergeError, UnsupportedModuleError
from deltatune.methods.reft import OrthogonalProjection, ReftIntervention
from deltatune.train.cli import main
from deltatune.train.config import ConfigError, TrainConfig
from tiny_models import ARCHS, build
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def randomized(delta_model: deltatune.DeltaModel, name: str = "default", seed: int = 0) -> deltatune.DeltaModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters(name):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return delta_model


def interventions(delta_model: deltatune.DeltaModel, name: str = "default") -> dict[str, ReftIntervention]:
    return {
        module: site.adapters[name]
        for module, site in delta_model.sites()
        if name in site.adapters and isinstance(site.adapters[name], ReftIntervention)
    }


@pytest.mark.parametrize("diagonal", ["signs", "truncated"])
def test_orthogonal_projection_equals_torchs_parametrization(diagonal: str) -> None:
    """The same `original` and `base` give torch's R; the signs are what torch reads off the diagonal."""
    torch.manual_seed(0)
    reference = nn.utils.parametrizations.orthogonal(nn.Linear(12, 3, bias=False))
    original = reference.parametrizations.weight.original
    with torch.no_grad():
        values = 0.3 * torch.randn(original.shape)
        values.diagonal().copy_(
            torch.tensor([1.0, -1.0, 1.0]) if diagonal == "signs" else torch.tensor([0.7, -1.4, 2.2])
        )
        original.copy_(values)
    ours = OrthogonalProjection(12, 3)
    with torch.no_grad():
        ours.original.copy_(original)
        ours.base.copy_(reference.parametrizations.weight[0].base)
        ours.signs.copy_(original.diagonal().int().float())
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-6, rtol=0)
    if diagonal == "signs":
        torch.testing.assert_close(ours.weight @ ours.weight.mT, torch.eye(3), atol=1e-6, rtol=0)


def test_random_reflectors_keep_r_orthonormal_and_nonzero() -> None:
    """Any value of the trained `original` (weight decay, a random draw) gives orthonormal rows."""
    projection = OrthogonalProjection(16, 4)
    with torch.no_grad():
        projection.original.copy_(0.1 * torch.randn(4, 16))
    torch.testing.assert_close(projection.weight @ projection.weight.mT, torch.eye(4), atol=1e-6, rtol=0)


def test_weight_decay_leaves_r_orthonormal_where_torchs_diagonal_would_truncate_it_to_zero() -> None:
    """torch reads the signs off `original`'s diagonal with `int()`: decayed from −1 it gives R = 0. Ours
    keeps the signs apart."""
    delta_model = randomized(deltatune.attach(build("llama"), deltatune.LoReftConfig(r=2)))
    optimizer = torch.optim.AdamW(list(delta_model.adapter_parameters("default")), lr=1e-3, weight_decay=0.01)
    delta_model(**ARCHS["llama"].inputs(1)).logits.pow(2).mean().backward()
    optimizer.step()
    for intervention in interventions(delta_model).values():
        rows = intervention.units[0].projection.weight
        torch.testing.assert_close(rows @ rows.mT, torch.eye(2), atol=1e-6, rtol=0)
    reference = nn.utils.parametrizations.orthogonal(nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original.diagonal().mul_(0.99999)
    assert torch.count_nonzero(reference.weight) == 0


def papers_output(arch: str, delta_model: deltatune.DeltaModel, inputs: dict, prefix: int) -> torch.Tensor:
    """The base model with plain hooks computing h + Rᵀ(W h + b − R h) at the first `prefix` positions."""
    model = build(arch)
    handles = []
    for block, intervention in interventions(delta_model).items():
        unit = intervention.units[0]
        rotation, source = unit.projection.weight.detach(), unit.learned_source

        def edit(module, args, output, rotation=rotation, source=source):
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            h = hidden[:, :prefix]
            changed = h + (source(h) - h @ rotation.mT) @ rotation
            hidden = torch.cat([changed, hidden[:, prefix:]], dim=1)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        handles.append(model.get_submodule(block).register_forward_hook(edit))
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_loreft_computes_the_papers_intervention_at_the_prefix(arch: str) -> None:
    delta_model = randomized(deltatune.attach(build(arch), deltatune.LoReftConfig(prefix_positions=2, r=2)))
    inputs = ARCHS[arch].inputs(1)
    with torch.no_grad():
        ours = delta_model(**inputs).logits
    torch.testing.assert_close(ours, papers_output(arch, delta_model, inputs, 2), atol=1e-5, rtol=0)


LENGTHS = (7, 4, 1)
"""Real tokens per row; the last row is shorter than the prefix and the suffix (they overlap, the suffix wins)."""


def padded(tokens: torch.Tensor, side: str) -> dict[str, torch.Tensor]:
    mask = torch.zeros_like(tokens)
    for row, length in enumerate(LENGTHS):
        mask[row, slice(0, length) if side == "right" else slice(tokens.shape[1] - length, None)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": tokens.masked_fill(mask == 0, 0), "attention_mask": mask, "position_ids": positions}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_each_padded_row_equals_its_run_alone(arch: str, side: str) -> None:
    """The positions are each row's own: a padded row's real positions compute what the row computes alone."""
    config = deltatune.LoReftConfig(prefix_positions=2, suffix_positions=2, r=2)
    delta_model = randomized(deltatune.attach(build(arch), config))
    tokens = ARCHS[arch].inputs(1)["input_ids"]
    batch = padded(tokens, side)
    with torch.no_grad():
        together = delta_model(**batch, output_hidden_states=True).hidden_states[-1]
        for row in range(len(LENGTHS)):
            real = batch["attention_mask"][row].bool()
            alone = delta_model(input_ids=batch["input_ids"][row, real][None], output_hidden_states=True)
            torch.testing.assert_close(together[row, real], alone.hidden_states[-1][0], atol=1e-5, rtol=0)
        with delta_model.disabled():
            base = delta_model(**batch, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(base, together, atol=1e-3)


def test_greedy_generation_of_padded_prompts_equals_each_prompt_alone() -> None:
    """Decoding steps count their positions after the cache: the new token is one of the last s."""
    delta_model = randomized(
        deltatune.attach(build("llama"), deltatune.LoReftConfig(prefix_positions=2, suffix_positions=1, r=2))
    )
    batch = padded(ARCHS["llama"].inputs(1)["input_ids"], "left")
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = delta_model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings
        )
        for row in range(len(LENGTHS)):
            real = batch["attention_mask"][row].bool()
            alone = delta_model.generate(input_ids=batch["input_ids"][row, real][None], **settings)
            assert torch.equal(together[row, -4:], alone[0, -4:])
    with torch.no_grad(), delta_model.disabled():
        base = delta_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
    assert not torch.equal(base, together)


def test_a_mixed_batch_with_lora_rows_equals_separate_runs() -> None:
    delta_model = deltatune.attach(build("gpt2"), deltatune.LoReftConfig(suffix_positions=2, r=2), "reft")
    delta_model.add("lora", deltatune.LoraConfig(r=2, target_modules="all-linear"))
    randomized(delta_model, "reft")
    randomized(delta_model, "lora", seed=1)
    inputs = ARCHS["gpt2"].inputs(1)
    with torch.no_grad():
        mixed = delta_model(**inputs, adapter_names=["lora", "reft", None]).logits
        delta_model.activate("reft")
        reft = delta_model(**inputs).logits
        delta_model.activate("lora")
        lora = delta_model(**inputs).logits
        with delta_model.disabled():
            base = delta_model(**inputs).logits
    for row, expected in enumerate((lora, reft, base)):
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-6, rtol=1e-5)


def test_merging_is_refused_naming_the_method_and_writes_nothing() -> None:
    delta_model = randomized(deltatune.attach(build("llama"), deltatune.LoReftConfig()))
    before = {key: value.clone() for key, value in delta_model.base_model.state_dict().items()}
    with pytest.raises(MergeError, match=r"ReFT \(reft\) cannot be merged"):
        delta_model.merge()
    after = delta_model.base_model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_run_or_is_refused_by_name(arch: str) -> None:
    """transformers 5 does not rerun the block's hooks when it recomputes: the gradients are a plain run's.
    4.57 reruns them in backward, after the call's positions are gone: refused, naming checkpointing."""

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        delta_model = randomized(deltatune.attach(build(arch), deltatune.LoReftConfig(suffix_positions=2, dropout=0)))
        if checkpointing:
            delta_model.gradient_checkpointing_enable()
        delta_model.train()
        delta_model(**ARCHS[arch].inputs(1), use_cache=False).logits.pow(2).mean().backward()
        return [parameter.grad for parameter in delta_model.adapter_parameters("default")]

    plain = gradients(False)
    assert all(gradient.abs().sum() > 0 for gradient in plain)
    if transformers.__version__.startswith("4."):
        with pytest.raises(DeltaTuneError, match="recomputed in backward by gradient checkpointing"):
            gradients(True)
        return
    checkpointed = gradients(True)
    for expected, actual in zip(plain, checkpointed):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_a_block_called_on_its_own_is_refused_by_name() -> None:
    delta_model = deltatune.attach(build("gpt2"), deltatune.LoReftConfig(r=2))
    with pytest.raises(DeltaTuneError, match="a block ran outside its model's forward call"):
        delta_model.base_model.transformer.h[0](torch.randn(1, 4, 32))


def test_packed_rows_are_refused_by_name() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoReftConfig(r=2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 3)
    with pytest.raises(DeltaTuneError, match="packed rows"):
        delta_model(**ARCHS["llama"].inputs(1), position_ids=positions)


def test_a_packed_training_run_is_refused_with_the_config() -> None:
    with pytest.raises(ConfigError, match="packing cannot be used with reft.*set packing: false$"):
        TrainConfig(model="m", task="causal-lm", train_file="t.jsonl", adapter={"method": "reft"}, packing=True)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(prefix_positions=0, suffix_positions=0), "intervenes nowhere"),
        (dict(layers=[5]), r"layers \[5\] do not exist: the model has 2 blocks"),
        (dict(r=33), "r=33 exceeds the hidden size 32"),
        (dict(non_linearity="nope"), "unknown non_linearity"),
        (dict(r=0), "r must be"),
    ],
)
def test_bad_reft_configs_are_refused_in_one_sentence(options: dict, message: str) -> None:
    with pytest.raises(DeltaTuneError, match=message):
        deltatune.attach(build("llama"), deltatune.LoReftConfig(**options))


def test_a_model_without_a_transformer_stack_is_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="ReFT needs a transformers model"):
        deltatune.attach(build("mlp"), deltatune.LoReftConfig())


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_a_folder_in_adapterhub_layout_loads_back_with_the_same_outputs(arch: str, tmp_path: Path) -> None:
    delta_model = randomized(deltatune.attach(build(arch), deltatune.LoReftConfig(suffix_positions=1, r=2)))
    inputs = ARCHS[arch].inputs(1)
    with torch.no_grad():
        expected = delta_model(**inputs).logits
    delta_model.save(tmp_path / "task", format="adapterhub")
    assert sorted(path.name for path in (tmp_path / "task").iterdir()) == [
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
    ]
    loaded = deltatune.load(build(arch), tmp_path / "task")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("option,value", [("dtype", "bfloat16"), ("output_reft", False), ("new_option", 1)])
def test_an_adapterhub_option_we_do_not_implement_is_refused_by_name(option: str, value, tmp_path: Path) -> None:
    deltatune.attach(build("llama"), deltatune.LoReftConfig()).save(tmp_path / "task", format="adapterhub")
    config_file = tmp_path / "task" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["config"][option] = value
    config_file.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=option):
        deltatune.load(build("llama"), tmp_path / "task")


def test_a_method_adapterhub_lacks_is_not_written_in_its_layout(tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.IA3Config(target_modules=["k_proj", "v_proj"]))
    with pytest.raises(DeltaTuneError, match="ReFT adapters; 'default' is a ia3 adapter"):
        delta_model.save(tmp_path / "task", format="adapterhub")
    assert not (tmp_path / "task").exists()


def test_reft_trains_through_the_command_and_its_loss_falls(tmp_path: Path) -> None:
    method = {"method": "reft", "prefix_positions": 2, "suffix_positions": 2, "r": 4, "dropout": 0.0}
    config = task_config(tmp_path, "causal-lm", method=method)
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "reft"
