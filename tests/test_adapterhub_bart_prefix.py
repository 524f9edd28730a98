"""AdapterHub's prefix tuning and MAM on a tiny BART (runs where `adapters` is installed: the transformers 4.57
line): the joined form is not T5's alone. AdapterHub's pool sits on BART's base model (`model.prefix_tuning...`);
its folders load here with its outputs on padded encoder rows, and ours load there with ours. Its UniPELT
folders on BART are refused for their LoRA part, which deltatune does not read on BART. (T5:
test_adapterhub_t5.py; BART in both transformers lines: test_prefix_joined.py.)"""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from test_adapterhub_mam import ADAPTERHUB_PARTS, ATOL  # noqa: E402
from test_prefix_joined import bart  # noqa: E402

PREFIX = dict(prefix_length=3, bottleneck_size=16)
CONFIGS = {
    "prefix": lambda: adapters.PrefixTuningConfig(**PREFIX),
    "gated-flat-prefix": lambda: adapters.PrefixTuningConfig(flat=True, prefix_length=4, use_gating=True),
    "mam": lambda: adapters.MAMConfig(adapters.PrefixTuningConfig(**PREFIX)),
}


def adapterhub_bart(config, name: str = "task") -> torch.nn.Module:
    model = bart()
    adapters.init(model)
    model.add_adapter(name, config=config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if any(part in parameter_name for part in ADAPTERHUB_PARTS):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.set_active_adapters(name)
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 96, (3, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    mask[2, -4:] = 0
    decoder_input_ids = torch.randint(3, 96, (3, 5), generator=generator)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_adapterhub_bart_prefix_folder_gives_its_outputs_both_ways(variant: str, tmp_path) -> None:
    reference = adapterhub_bart(CONFIGS[variant]())
    expected = outputs(reference)
    reference.save_adapter(str(tmp_path / "theirs"), "task")
    loaded = deltatune.load(bart(), tmp_path / "theirs")
    torch.testing.assert_close(outputs(loaded), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded), expected, atol=1e-3)

    loaded.save(tmp_path / "ours", format="adapterhub")
    back = adapterhub_bart(adapters.LoRAConfig(r=2), name="other")
    assert back.load_adapter(str(tmp_path / "ours"), use_safetensors=True) == "task"
    back.set_active_adapters("task")
    torch.testing.assert_close(outputs(back), expected, atol=ATOL, rtol=0)


def test_adapterhub_unipelt_folder_on_bart_is_refused_for_its_lora_part(tmp_path) -> None:
    adapterhub_bart(adapters.UniPELTConfig()).save_adapter(str(tmp_path / "task"), "task")
    model = bart()
    with pytest.raises(deltatune.AdapterFileError, match="LoRA on .* not on 'bart'"):
        deltatune.load(model, tmp_path / "task")
    assert not [name for name, _ in model.named_modules() if name.endswith("deltatune")]
