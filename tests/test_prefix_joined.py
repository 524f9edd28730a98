"""Prefixes joined at T5's attention modules (AdapterHub's form, `methods/prefix_joined.py`) against the model's
own computations, in both transformers lines: cached generation against full forward calls (the encoder runs
once, the cache never doubles a prefix), padded encoder rows against the same rows alone, SDPA against eager
attention, gradient checkpointing against plain backward, a collapsed MLP against the MLP; MAM and UniPELT on
T5 train through `deltatune train`. (Against AdapterHub itself: test_adapterhub_t5.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

import deltatune
from deltatune.train.cli import main
from resume_checks import (
    RESUME_SETTINGS,
    assert_resume_equals_the_uninterrupted_run,
    assert_resume_with_a_switched_setting_is_refused,
)
from tiny_models import ARCHS, build
from training_fixtures import task_config

PREFIX = dict(
    num_virtual_tokens=3,
    prefix_projection=True,
    encoder_hidden_size=8,
    embedding_dim="hidden_size",
    shift_positions=False,
    encoder_prefix=True,
    cross_prefix=True,
)
CONFIGS = {
    "mlp": lambda: deltatune.PrefixTuningConfig(**PREFIX),
    "flat-gated": lambda: deltatune.PrefixTuningConfig(**{**PREFIX, "prefix_projection": False, "use_gating": True}),
    "mam": lambda: deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
}


def randomized(delta_model: deltatune.DeltaModel) -> deltatune.DeltaModel:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return delta_model.eval()


def t5(attention: str = "eager") -> torch.nn.Module:
    model = build("t5")
    model.set_attn_implementation(attention)
    return model


def bart(attention: str = "eager") -> torch.nn.Module:
    """A tiny BART: learned positions, attention modules that take `attention_mask`."""
    torch.manual_seed(0)
    layers = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
    config = BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        **layers,
    )
    model = BartForConditionalGeneration(config).eval()
    model.set_attn_implementation(attention)
    return model


MODELS = {"t5": t5, "bart": bart}


def joined(variant: str, attention: str = "eager", arch: str = "t5") -> deltatune.DeltaModel:
    return randomized(deltatune.attach(MODELS[arch](attention), CONFIGS[variant]()))


@pytest.mark.parametrize("arch", list(MODELS))
def test_joined_prefix_generate_with_its_cache_equals_full_forward_calls(arch: str) -> None:
    """Greedy cached generation: the encoder runs once, and every step's logits are those of a full forward
    call over the whole decoder sequence (a cache that stored a prefix would double it)."""
    delta_model = joined("mam", arch=arch)
    encoder_calls = []
    delta_model.base_model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    inputs = {"input_ids": ARCHS["t5"].inputs(1)["input_ids"][:1]}
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        generated = delta_model.generate(**inputs, **settings, output_logits=True)
        assert len(encoder_calls) == 1
        sequences = generated.sequences
        for step, step_logits in enumerate(generated.logits):
            full = delta_model(**inputs, decoder_input_ids=sequences[:, : step + 1]).logits[:, -1]
            torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=0)
    assert sequences.shape[1] == 6


def test_joined_prefix_padded_encoder_rows_equal_the_rows_alone() -> None:
    delta_model = joined("mlp")
    inputs = ARCHS["t5"].inputs(1)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -3:] = 0
    with torch.no_grad():
        padded = delta_model(**inputs, attention_mask=mask).logits[0]
        alone = delta_model(input_ids=inputs["input_ids"][:1, :-3], decoder_input_ids=inputs["decoder_input_ids"][:1])
    torch.testing.assert_close(padded, alone.logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_joined_prefix_sdpa_equals_eager(variant: str, arch: str) -> None:
    inputs = ARCHS["t5"].inputs(1)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, -2:] = 0
    with torch.no_grad():
        eager = joined(variant, arch=arch)(**inputs, attention_mask=mask).logits
        sdpa = joined(variant, "sdpa", arch=arch)(**inputs, attention_mask=mask).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_joined_prefix_gradient_checkpointing_gives_the_same_gradients() -> None:
    """A checkpointed layer runs twice; it must read the same prefix both times."""
    gradients = []
    for checkpointing in (False, True):
        delta_model = joined("flat-gated").train()
        if checkpointing:
            delta_model.base_model.gradient_checkpointing_enable({"use_reentrant": False})
        inputs = ARCHS["t5"].inputs(1)
        delta_model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
        gradients.append([parameter.grad.clone() for parameter in delta_model.adapter_parameters("default")])
    assert all(gradient.abs().sum() > 0 for gradient in gradients[0])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)


def test_joined_prefix_collapses_to_its_tables_and_reloads(tmp_path) -> None:
    delta_model = joined("mlp")
    inputs = ARCHS["t5"].inputs(1)
    with torch.no_grad():
        expected = delta_model(**inputs).logits
        deltatune.collapse_soft_prompt(delta_model)
        torch.testing.assert_close(delta_model(**inputs).logits, expected, atol=1e-6, rtol=0)
        delta_model.save(tmp_path / "collapsed")
        loaded = deltatune.load(t5(), tmp_path / "collapsed").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
    assert not loaded.configs["default"].prefix_projection


MAM = {"method": "mam", "prefix_tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}}


def test_mam_on_t5_resumes_bit_exactly_and_refuses_another_cross_prefix(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "seq2seq-lm", **{**RESUME_SETTINGS, "adapter": MAM})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "adapter.prefix_tuning.cross_prefix=false", "adapter.prefix_tuning.cross_prefix"
    )


@pytest.mark.parametrize(
    "method",
    [
        MAM,
        {"method": "unipelt", "prefix_tuning": {"num_virtual_tokens": 3}, "adapter": {"reduction_factor": 4}},
    ],
    ids=["mam", "unipelt"],
)
def test_mam_and_unipelt_on_t5_train_through_the_command_and_their_loss_falls(method: dict, tmp_path) -> None:
    assert main(["train", str(task_config(tmp_path, "seq2seq-lm", method=method)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_two_active_joined_prefixes_equal_one_prefix_of_both_tables() -> None:
    """Adapters a and b active together: each joins after what the other joined, b (activated second) in front,
    the same as one flat prefix whose rows are b's then a's (cross-attention included)."""
    flat = {**PREFIX, "prefix_projection": False}
    delta_model = deltatune.attach(t5(), deltatune.PrefixTuningConfig(**{**flat, "num_virtual_tokens": 2}), name="a")
    delta_model.add("b", deltatune.PrefixTuningConfig(**{**flat, "num_virtual_tokens": 3}))
    both = deltatune.attach(t5(), deltatune.PrefixTuningConfig(**{**flat, "num_virtual_tokens": 5}), name="ab")

    def tables(model: deltatune.DeltaModel, name: str) -> dict[str, torch.Tensor]:
        return {key.split(".deltatune")[0]: value for key, value in model.named_parameters() if f"{name}.source" in key}

    with torch.no_grad():
        for holder, table in tables(both, "ab").items():
            table.copy_(torch.cat([tables(delta_model, "b")[holder], tables(delta_model, "a")[holder]]))
        delta_model.activate("a", "b")
        inputs = ARCHS["t5"].inputs(1)
        torch.testing.assert_close(delta_model(**inputs).logits, both(**inputs).logits, atol=1e-6, rtol=0)
    assert len(tables(both, "ab")) == 3


def test_a_mixed_batch_with_a_joined_prefix_is_refused() -> None:
    delta_model = joined("mlp")
    delta_model.add("other", deltatune.LoraConfig(r=2, target_modules=["q", "v"]))
    with pytest.raises(deltatune.DeltaTuneError, match="mixed batches"):
        delta_model(**ARCHS["t5"].inputs(1), adapter_names=["default", "other", None])
