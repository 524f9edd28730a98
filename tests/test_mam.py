"""MAM (prefix tuning + a parallel adapter) is its two parts, composed: the same weights as a prefix-tuning
adapter and a parallel bottleneck adapter stacked give its outputs; it trains through `deltatune train`.
(Against AdapterHub itself: test_adapterhub_mam.py.)"""

from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError
from deltatune.train.cli import main
from tiny_models import build, run
from training_fixtures import task_config

PREFIX = {"num_virtual_tokens": 3, "encoder_hidden_size": 8}


def randomized(delta_model: deltatune.DeltaModel, name: str) -> deltatune.DeltaModel:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters(name):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return delta_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_mam_equals_its_prefix_and_parallel_adapter_stacked(arch: str) -> None:
    config = deltatune.MAMConfig(prefix_tuning=PREFIX)
    mam = randomized(deltatune.attach(build(arch), config, name="mam"), "mam")
    parts = deltatune.attach(build(arch), config.prefix_tuning, name="prefix")
    parts.add("adapter", config.adapter)
    state = {name: parameter for name, parameter in mam.named_parameters() if parameter.requires_grad}
    with torch.no_grad():
        for part in ("prefix", "adapter"):
            for name, parameter in parts.named_parameters():
                if f".{part}." in name:
                    parameter.copy_(state[name.replace(f".{part}.", ".mam.")])
    parts.activate("prefix", "adapter")
    with torch.no_grad():
        torch.testing.assert_close(run(mam, arch), run(parts, arch), atol=0, rtol=0)
        with mam.disabled():
            assert not torch.allclose(run(mam, arch), run(parts, arch), atol=1e-3)


def test_mam_defaults_are_adapterhubs() -> None:
    config = deltatune.MAMConfig()
    prefix, adapter = config.prefix_tuning, config.adapter
    assert (prefix.num_virtual_tokens, prefix.encoder_hidden_size, prefix.prefix_projection) == (30, 800, True)
    assert (prefix.embedding_dim, prefix.shift_positions) == ("hidden_size", False)
    assert (prefix.encoder_prefix, prefix.cross_prefix) == (True, True)
    assert (adapter.parallel, adapter.reduction_factor, adapter.scaling, adapter.init_weights) == (
        True,
        2,
        4.0,
        "zero_up",
    )
    assert deltatune.MAMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_mam_trains_through_the_command_and_its_loss_falls(tmp_path) -> None:
    method = {"method": "mam", "prefix_tuning": PREFIX}
    assert main(["train", str(task_config(tmp_path, "causal-lm", method=method)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["method"] == "mam"


def test_unipelt_trains_through_the_command_and_its_loss_falls(tmp_path) -> None:
    method = {"method": "unipelt", "prefix_tuning": PREFIX, "adapter": {"reduction_factor": 4}, "lora": {"r": 2}}
    assert main(["train", str(task_config(tmp_path, "causal-lm", method=method)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_unipelt_defaults_are_adapterhubs() -> None:
    config = deltatune.UniPELTConfig()
    prefix, adapter, lora = config.prefix_tuning, config.adapter, config.lora
    assert (prefix.num_virtual_tokens, prefix.encoder_hidden_size, prefix.use_gating) == (10, 512, True)
    assert (adapter.preset, adapter.reduction_factor, adapter.use_gating) == ("pfeiffer", 16, True)
    assert (lora.r, lora.lora_alpha, lora.use_gating) == (8, 2, True)
    assert deltatune.UniPELTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_gated_lora_refuses_to_merge_and_other_layer_forms() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=2, use_gating=True))
    with pytest.raises(DeltaTuneError, match="cannot be merged"):
        delta_model.merge()
    with pytest.raises(DeltaTuneError, match="use_gating"):
        deltatune.LoraConfig(r=2, use_gating=True, use_dora=True)


def test_a_prefix_that_keeps_positions_is_refused_in_peft_format(tmp_path) -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.MAMConfig(prefix_tuning=PREFIX).prefix_tuning)
    with pytest.raises(DeltaTuneError, match="shift_positions=False"):
        delta_model.save(tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_encoder_and_cross_attention_prefixes_that_shift_positions_are_refused() -> None:
    """They exist only in AdapterHub's form, joined at the attention modules, which keeps real positions."""
    model = build("t5")
    with pytest.raises(DeltaTuneError, match="set shift_positions=False"):
        deltatune.attach(model, deltatune.MAMConfig(prefix_tuning={**PREFIX, "shift_positions": True}))
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]


def test_a_mixed_batch_of_prefixes_that_shift_and_keep_positions_is_refused() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.MAMConfig(prefix_tuning=PREFIX), name="mam")
    delta_model.add("peft_form", deltatune.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(DeltaTuneError, match="separate batches"):
        run(delta_model, "llama", adapter_names=["mam", "peft_form", None])


def test_a_compacter_or_lora_adapter_is_refused_in_adapterhub_format(tmp_path) -> None:
    for config in (
        deltatune.CompacterConfig(reduction_factor=4),
        deltatune.LoraConfig(r=2, target_modules="all-linear"),
    ):
        delta_model = deltatune.attach(build("bert"), config, name="task")
        with pytest.raises(deltatune.DeltaTuneError, match="format='deltatune'"):
            delta_model.save(tmp_path / "task", format="adapterhub")
        assert not (tmp_path / "task").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mam_generate_with_its_cache_equals_full_forward_calls(arch: str) -> None:
    """Decoding steps keep the real positions behind the prefix: greedy `generate` (cached) picks the
    tokens that full forward calls over the whole sequence pick."""
    delta_model = randomized(deltatune.attach(build(arch), deltatune.MAMConfig(prefix_tuning=PREFIX)), "default")
    prompt = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        generated = delta_model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        sequence = prompt
        for _ in range(5):
            following = delta_model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, following], dim=1)
    assert torch.equal(generated, sequence)
