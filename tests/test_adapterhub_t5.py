"""AdapterHub on tiny T5, an encoder-decoder (runs where `adapters` is installed: the transformers 4.57 line).

AdapterHub keeps T5's bottleneck adapters in the sublayer modules themselves (`encoder.block.0.layer.1`, the
encoder's feed-forward; `decoder.block.0.layer.2`, the decoder's), in both stacks, and its LoRA on the q and v
of every attention, self- and cross-attention alike. Its folders load here with its outputs on batches whose
encoder rows are padded, and ours load there with ours. Its Compacter folders on T5 leave out the shared PHM
rule, so they are refused, naming it.

Its prefix tuning on T5 (and so MAM and UniPELT) builds one prefix per kind of attention (the encoder's
self-attention, the decoder's, the decoder's cross-attention; `encoder_prefix` and `cross_prefix` switch the
first and the last), each its own MLP (or flat table), joined after each layer's cache; the relative position
bias then runs over the lengthened keys. Those folders load here with its outputs too, and ours there with ours;
generation from them gives its logits, with the cache and without. A prefix of ours that shifts the decoder's
positions (peft's form) is not written in its format.
"""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from test_adapterhub_mam import ATOL, adapterhub_mam, eager, outputs, padded_inputs  # noqa: E402

THEIR_CONFIGS = {
    "double_seq_bn": lambda: adapters.DoubleSeqBnConfig(),
    "seq_bn": lambda: adapters.SeqBnConfig(),
    "par_bn": lambda: adapters.ParBnConfig(),
    "gated-seq_bn": lambda: adapters.SeqBnConfig(use_gating=True),
    "lora": lambda: adapters.LoRAConfig(r=4, alpha=8),
    "gated-lora": lambda: adapters.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], use_gating=True),
}


@pytest.mark.parametrize("variant", list(THEIR_CONFIGS))
def test_adapterhub_t5_folder_gives_its_outputs_both_ways(variant: str, tmp_path) -> None:
    reference = adapterhub_mam("t5", THEIR_CONFIGS[variant]())
    expected = outputs(reference, "t5")
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager("t5"), tmp_path / "theirs")
    torch.testing.assert_close(outputs(loaded, "t5"), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded, "t5"), expected, atol=1e-3)

    loaded.save(tmp_path / "ours", format="adapterhub")
    back = adapterhub_mam("t5", adapters.LoRAConfig(r=2), name="other")
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True) == "task"
    back.set_active_adapters("task")
    torch.testing.assert_close(outputs(back, "t5"), expected, atol=ATOL, rtol=0)


def test_adapterhub_t5_adapters_sit_in_both_stacks_and_lora_in_both_attentions(tmp_path) -> None:
    """The placement the outputs rest on: T5's encoder and decoder feed-forwards get adapters, every self- and
    cross-attention its q and v factors."""
    for variant, expected in {
        "seq_bn": {"encoder.block.0.layer.1.dropout", "decoder.block.1.layer.2.dropout"},
        "lora": {"encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.v"},
    }.items():
        reference = adapterhub_mam("t5", THEIR_CONFIGS[variant]())
        reference.save_adapter(str(tmp_path / variant), "task")
        placed = {name for name, _ in deltatune.load(eager("t5"), tmp_path / variant).sites()}
        assert expected <= placed


PREFIX = dict(prefix_length=3, bottleneck_size=16)
PREFIX_CONFIGS = {
    "mlp-prefix": lambda: adapters.PrefixTuningConfig(**PREFIX),
    "flat-prefix": lambda: adapters.PrefixTuningConfig(flat=True, prefix_length=4),
    "gated-prefix": lambda: adapters.PrefixTuningConfig(**PREFIX, use_gating=True, shared_gating=False),
    "decoder-self-only": lambda: adapters.PrefixTuningConfig(**PREFIX, encoder_prefix=False, cross_prefix=False),
    "encoder-only": lambda: adapters.PrefixTuningConfig(**PREFIX, cross_prefix=False),
    "mam": lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(**PREFIX)),
    "unipelt": lambda: adapters.UniPELTConfig(),
}


@pytest.mark.parametrize("variant", list(PREFIX_CONFIGS))
def test_adapterhub_t5_prefix_mam_and_unipelt_folders_give_their_outputs_both_ways(variant: str, tmp_path) -> None:
    reference = adapterhub_mam("t5", PREFIX_CONFIGS[variant]())
    expected = outputs(reference, "t5")
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager("t5"), tmp_path / "theirs")
    torch.testing.assert_close(outputs(loaded, "t5"), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded, "t5"), expected, atol=1e-3)

    loaded.save(tmp_path / "ours", format="adapterhub")
    back = adapterhub_mam("t5", adapters.LoRAConfig(r=2), name="other")
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True) == "task"
    back.set_active_adapters("task")
    torch.testing.assert_close(outputs(back, "t5"), expected, atol=ATOL, rtol=0)


def test_adapterhub_t5_prefixes_reach_the_attentions_its_switches_name(tmp_path) -> None:
    """The placement the outputs rest on: every encoder self-attention, decoder self-attention and cross-attention
    holds a prefix, and a folder with `cross_prefix=False` leaves the cross-attention alone."""
    reference = adapterhub_mam("t5", PREFIX_CONFIGS["encoder-only"]())
    reference.save_adapter(str(tmp_path / "task"), "task")
    placed = {name for name, _ in deltatune.load(eager("t5"), tmp_path / "task").sites()}
    assert placed == {
        f"{stack}.block.{block}.layer.0.SelfAttention" for stack in ("encoder", "decoder") for block in (0, 1)
    }


def test_adapterhub_t5_prefix_generates_its_tokens(tmp_path) -> None:
    """Greedy generation with the cache: the encoder runs once with its prefix, every decoder step joins the self-
    and cross-attention prefixes again (the cache holds real keys only), as AdapterHub's does."""
    reference = adapterhub_mam("t5", PREFIX_CONFIGS["mam"]())
    reference.save_adapter(str(tmp_path / "task"), "task")
    inputs = {key: value for key, value in padded_inputs("t5").items() if not key.startswith("decoder_")}
    settings = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        expected = reference.generate(**inputs, **settings)
        loaded = deltatune.load(eager("t5"), tmp_path / "task")
        for use_cache in (True, False):
            ours = loaded.generate(**inputs, **settings, use_cache=use_cache)
            assert torch.equal(ours.sequences, expected.sequences)
            torch.testing.assert_close(torch.stack(ours.logits), torch.stack(expected.logits), atol=ATOL, rtol=0)


def test_our_peft_form_prefix_on_t5_is_not_written_in_adapterhub_format(tmp_path) -> None:
    """Our prefix that shifts the decoder's positions (through the cache, peft's form) computes another prefix
    than AdapterHub's: refused, nothing written."""
    ours = deltatune.attach(eager("t5"), deltatune.PrefixTuningConfig(num_virtual_tokens=3), name="task")
    with pytest.raises(deltatune.DeltaTuneError, match="shift_positions=True"):
        ours.save(tmp_path / "task", format="adapterhub")
    assert not (tmp_path / "task").exists()


def test_adapterhub_compacter_folder_on_t5_is_refused_for_the_shared_rule_it_leaves_out(tmp_path) -> None:
    """AdapterHub keeps Compacter's shared PHM rule on T5 at `shared_parameters.NAME.phm_rule` of the top model and
    leaves it out of the folder (a trained rule would be lost); the load names the missing tensor, nothing added."""
    reference = adapterhub_mam("t5", adapters.CompacterConfig(reduction_factor=4))
    reference.save_adapter(str(tmp_path / "task"), "task")
    assert any(name.startswith("shared_parameters.task.") for name, _ in reference.named_parameters())
    model = eager("t5")
    with pytest.raises(deltatune.DeltaTuneError, match="phm_rule"):
        deltatune.load(model, tmp_path / "task")
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]
