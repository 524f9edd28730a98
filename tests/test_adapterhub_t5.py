"""AdapterHub on tiny T5, an encoder-decoder (runs where `adapters` is installed: the transformers 4.57 line).

AdapterHub keeps T5's bottleneck adapters in the sublayer modules themselves (`encoder.block.0.layer.1`, the
encoder's feed-forward; `decoder.block.0.layer.2`, the decoder's), in both stacks, and its LoRA on the q and v
of every attention, self- and cross-attention alike. Its folders load here with its outputs on batches whose
encoder rows are padded, and ours load there with ours. Its Compacter folders on T5 leave out the shared PHM
rule, so they are refused, naming it.

Its prefix tuning on T5 (and so MAM and UniPELT) puts three prefixes, each through its own MLP, into the
encoder's self-attention, the decoder's self-attention and the decoder's cross-attention; deltatune's prefix
reaches the decoder's self-attention only (through the model's cache), so those folders are refused with that
reason; ours on T5 shift the decoder's positions, which AdapterHub's prefix never does, and are not written in
its format.
"""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from test_adapterhub_mam import ATOL, adapterhub_mam, eager, outputs  # noqa: E402

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


@pytest.mark.parametrize(
    "config",
    [
        lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(bottleneck_size=16, prefix_length=3)),
        lambda: adapters.UniPELTConfig(),
    ],
    ids=["mam", "unipelt"],
)
def test_adapterhub_mam_and_unipelt_on_t5_are_refused_for_their_encoder_and_cross_attention_prefixes(
    config, tmp_path
) -> None:
    reference = adapterhub_mam("t5", config())
    reference.save_adapter(str(tmp_path / "task"), "task")
    model = eager("t5")
    with pytest.raises(deltatune.AdapterFileError, match="encoder and cross-attention"):
        deltatune.load(model, tmp_path / "task")
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]


def test_our_mam_on_t5_is_not_written_in_adapterhub_format(tmp_path) -> None:
    """Our prefix on T5 must shift the decoder's positions (T5's stack takes no position_ids), which AdapterHub's
    prefix never does, and it has none of the encoder and cross-attention prefixes AdapterHub would build."""
    config = deltatune.MAMConfig(
        prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 16, "shift_positions": True}
    )
    ours = deltatune.attach(eager("t5"), config, name="task")
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
