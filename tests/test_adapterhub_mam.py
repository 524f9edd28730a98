"""MAM against AdapterHub's `MAMConfig` (runs where `adapters` is installed: the transformers 4.57 line).

AdapterHub builds MAM (prefix tuning + a parallel adapter) on a copy of the same tiny model, every
adapter parameter random; its folder loads here with its outputs, padded batches included.

Both run eager attention: AdapterHub's prefix lengthens the keys inside attention, and on GPT-2 and Llama
its SDPA path then takes `is_causal` with the causal mask aligned top-left (queries see the prefix and
too few real keys), so its SDPA outputs differ from its own eager ones (0.08 and 0.12 here); BERT's agree.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from tiny_models import ARCHS, build  # noqa: E402

ATOL = 1e-5
ADAPTERHUB_PARTS = (".adapters.", "prefix_tunings.", "prefix_gates.", ".loras.")


def padded_inputs(arch: str) -> dict[str, torch.Tensor]:
    """The arch's tokens with the last positions of two rows padded (right padding)."""
    inputs = ARCHS[arch].inputs(1)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -2:] = 0
    mask[2, -4:] = 0
    return {**inputs, "attention_mask": mask}


def outputs(model: torch.nn.Module, arch: str) -> torch.Tensor:
    """Logits of the real (unpadded) positions, BERT's classification logits, or T5's decoder logits (its
    padding is the encoder's)."""
    inputs = padded_inputs(arch)
    with torch.no_grad():
        logits = model(**inputs).logits
    if logits.dim() == 2 or "decoder_input_ids" in inputs:
        return logits
    return logits[inputs["attention_mask"].bool()]


def eager(arch: str) -> torch.nn.Module:
    """The tiny model with eager attention (see the module docstring)."""
    model = build(arch)
    model.config._attn_implementation = "eager"
    return model


def adapterhub_mam(arch: str, config, name: str = "task") -> torch.nn.Module:
    model = copy.deepcopy(eager(arch))
    adapters.init(model)
    model.add_adapter(name, config=config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if any(part in parameter_name for part in ADAPTERHUB_PARTS):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.set_active_adapters(name)
    return model.eval()


MAM_CONFIGS = {
    "mlp-prefix": lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(bottleneck_size=16, prefix_length=3)),
    "flat-prefix": lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(flat=True, prefix_length=4)),
}


@pytest.mark.parametrize("variant", list(MAM_CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_adapterhub_mam_folder_loads_with_its_outputs(variant: str, arch: str, tmp_path) -> None:
    reference = adapterhub_mam(arch, MAM_CONFIGS[variant]())
    expected = outputs(reference, arch)
    reference.save_adapter(str(tmp_path / "task"), "task")

    loaded = deltatune.load(eager(arch), tmp_path / "task")
    assert isinstance(loaded.configs["task"], deltatune.MAMConfig)
    torch.testing.assert_close(outputs(loaded, arch), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded, arch), expected, atol=1e-3)


OUR_CONFIGS = {
    "mlp-prefix": lambda: deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 16}),
    "flat-prefix": lambda: deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 4, "prefix_projection": False}),
    "houlsby": lambda: deltatune.BottleneckConfig(preset="houlsby", reduction_factor=4),
}


@pytest.mark.parametrize("variant", list(OUR_CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_our_adapterhub_folder_loads_in_adapterhub_with_our_outputs(variant: str, arch: str, tmp_path) -> None:
    ours = deltatune.attach(eager(arch), OUR_CONFIGS[variant](), name="task")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ours.adapter_parameters("task"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    expected = outputs(ours, arch)
    ours.save(tmp_path / "task", format="adapterhub")

    reference = copy.deepcopy(eager(arch))
    adapters.init(reference)
    assert reference.load_adapter(str(tmp_path / "task"), use_safetensors=True) == "task"
    reference.set_active_adapters("task")
    torch.testing.assert_close(outputs(reference.eval(), arch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(outputs(eager(arch), arch), expected, atol=1e-3)


def test_an_adapterhub_union_of_other_parts_is_refused_naming_them(tmp_path) -> None:
    """A union deltatune does not compose (prefix tuning + LoRA alone) is refused with one message, nothing added."""
    union = adapters.ConfigUnion(adapters.PrefixTuningConfig(prefix_length=3), adapters.LoRAConfig(r=2))
    reference = adapterhub_mam("bert", union)
    reference.save_adapter(str(tmp_path / "task"), "task")
    model = eager("bert")
    with pytest.raises(deltatune.AdapterFileError, match="union of \\['prefix_tuning', 'lora'\\]"):
        deltatune.load(model, tmp_path / "task")
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]
