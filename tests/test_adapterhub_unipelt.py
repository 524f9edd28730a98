"""UniPELT's gates against AdapterHub's `use_gating` (runs where `adapters` is installed): a gated
bottleneck adapter with random weights, gate included, gives AdapterHub's outputs on padded batches
(the gate's mean runs over the padding too, in both libraries), in both directions through its folders."""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from deltatune.errors import UnsupportedFormatError  # noqa: E402
from test_adapterhub_mam import ATOL, adapterhub_mam, eager, outputs  # noqa: E402

GATED_BOTTLENECKS = {
    "seq_bn": lambda: adapters.SeqBnConfig(use_gating=True),
    "double_seq_bn": lambda: adapters.DoubleSeqBnConfig(use_gating=True),
    "par_bn": lambda: adapters.ParBnConfig(use_gating=True),
}


@pytest.mark.parametrize("variant", list(GATED_BOTTLENECKS))
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_adapterhub_gated_bottleneck_gives_its_outputs_both_ways(variant: str, arch: str, tmp_path) -> None:
    reference = adapterhub_mam(arch, GATED_BOTTLENECKS[variant]())
    expected = outputs(reference, arch)
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager(arch), tmp_path / "theirs")
    assert loaded.configs["task"].use_gating
    torch.testing.assert_close(outputs(loaded, arch), expected, atol=ATOL, rtol=0)
    for _, site in loaded.sites():
        if getattr(site.adapters["task"], "gate", None) is not None:
            site.adapters["task"].gate = None
    assert not torch.allclose(outputs(loaded, arch), expected, atol=1e-3)

    ours = deltatune.load(eager(arch), tmp_path / "theirs")
    ours.save(tmp_path / "ours", format="adapterhub")
    back = adapterhub_mam(arch, GATED_BOTTLENECKS[variant](), name="other")
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True) == "task"
    back.set_active_adapters("task")
    torch.testing.assert_close(outputs(back, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_adapterhub_lora_folder_gives_its_outputs(gated: bool, arch: str, tmp_path) -> None:
    """AdapterHub's LoRA on q and v (on GPT-2 the q and v parts of its merged c_attn); gated, the gate takes
    the place of α/r."""
    reference = adapterhub_mam(arch, adapters.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], use_gating=gated))
    expected = outputs(reference, arch)
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager(arch), tmp_path / "theirs")
    assert loaded.configs["task"].use_gating is gated
    torch.testing.assert_close(outputs(loaded, arch), expected, atol=ATOL, rtol=0)
    with loaded.disabled():  # BERT's pooled logits move by a few 1e-4 only
        assert not torch.allclose(outputs(loaded, arch), expected, atol=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-gate", "key-value-gates"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_adapterhub_gated_prefix_gives_its_outputs(shared: bool, arch: str, tmp_path) -> None:
    config = adapters.PrefixTuningConfig(prefix_length=3, bottleneck_size=16, use_gating=True, shared_gating=shared)
    reference = adapterhub_mam(arch, config)
    expected = outputs(reference, arch)
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager(arch), tmp_path / "theirs")
    assert loaded.configs["task"].use_gating
    torch.testing.assert_close(outputs(loaded, arch), expected, atol=ATOL, rtol=0)
    with torch.no_grad():  # gates shut: the prefix's keys and values go to zero
        for _, site in loaded.sites():
            if hasattr(site.adapters["task"], "gate"):
                site.adapters["task"].gate.bias.fill_(-30.0)
    assert not torch.allclose(outputs(loaded, arch), expected, atol=ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_adapterhub_unipelt_folder_loads_with_its_outputs(arch: str, tmp_path) -> None:
    """AdapterHub's UniPELT (gated prefix, gated seq_bn, gated LoRA on q and v), every weight random."""
    reference = adapterhub_mam(arch, adapters.UniPELTConfig())
    expected = outputs(reference, arch)
    reference.save_adapter(str(tmp_path / "task"), "task")
    loaded = deltatune.load(eager(arch), tmp_path / "task")
    config = loaded.configs["task"]
    assert isinstance(config, deltatune.UniPELTConfig)
    assert config.prefix_tuning.use_gating and config.adapter.use_gating and config.lora.use_gating
    torch.testing.assert_close(outputs(loaded, arch), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded, arch), expected, atol=ATOL)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("letters", [["q", "v"], ["k"], ["q", "k", "v"]], ids="".join)
def test_adapterhub_lora_on_gpt2_adapts_the_parts_of_c_attn_its_letters_name(
    letters: list[str], gated: bool, tmp_path
) -> None:
    """GPT-2's c_attn computes q, k and v as thirds of one output; AdapterHub's LoRA there adapts the thirds its
    `attn_matrices` name, each with its own factors (and gate); its folder loads here with its outputs, and
    ours, saved back, loads there with them."""
    config = adapters.LoRAConfig(r=4, alpha=8, attn_matrices=letters, use_gating=gated)
    reference = adapterhub_mam("gpt2", config)
    expected = outputs(reference, "gpt2")
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(eager("gpt2"), tmp_path / "theirs")
    assert loaded.configs["task"].fused_slices == {"c_attn": [letter in letters for letter in "qkv"]}
    torch.testing.assert_close(outputs(loaded, "gpt2"), expected, atol=ATOL, rtol=0)

    loaded.save(tmp_path / "ours", format="adapterhub")
    back = adapterhub_mam("gpt2", adapters.LoRAConfig(r=2), name="other")
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True) == "task"
    back.set_active_adapters("task")
    torch.testing.assert_close(outputs(back, "gpt2"), expected, atol=ATOL, rtol=0)


def test_a_lora_on_all_of_gpt2s_c_attn_is_refused_in_adapterhub_format(tmp_path) -> None:
    """One rank-r pair over q, k and v together is not AdapterHub's three pairs: refused, nothing written."""
    ours = deltatune.attach(eager("gpt2"), deltatune.LoraConfig(r=4, target_modules=["c_attn"]), name="task")
    with pytest.raises(UnsupportedFormatError, match="fused_slices"):
        ours.save(tmp_path / "task", format="adapterhub")
    assert not (tmp_path / "task").exists()


OUR_CONFIGS = {
    "unipelt": lambda: deltatune.UniPELTConfig(
        prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 16}, adapter={"reduction_factor": 4}
    ),
    "gated-lora": lambda: deltatune.LoraConfig(
        r=4, lora_alpha=8, use_gating=True, fused_slices={"c_attn": [True, False, True]}
    ),
    "gated-prefix": lambda: deltatune.PrefixTuningConfig(
        num_virtual_tokens=3,
        prefix_projection=True,
        encoder_hidden_size=16,
        embedding_dim="hidden_size",
        shift_positions=False,
        use_gating=True,
        shared_gating=False,
    ),
}


@pytest.mark.parametrize("variant", list(OUR_CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_our_gated_adapterhub_folder_loads_in_adapterhub_with_our_outputs(variant: str, arch: str, tmp_path) -> None:
    ours = deltatune.attach(eager(arch), OUR_CONFIGS[variant](), name="task")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ours.adapter_parameters("task"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    expected = outputs(ours, arch)
    ours.save(tmp_path / "task", format="adapterhub")
    reference = adapterhub_mam(arch, adapters.LoRAConfig(r=2), name="other")
    assert reference.load_adapter(str(tmp_path / "task"), use_safetensors=True) == "task"
    reference.set_active_adapters("task")
    torch.testing.assert_close(outputs(reference, arch), expected, atol=ATOL, rtol=0)
    with ours.disabled():
        assert not torch.allclose(outputs(ours, arch), expected, atol=ATOL)
