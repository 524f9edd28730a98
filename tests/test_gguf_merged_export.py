"""A GGUF base with an adapter merged in, written as a new GGUF file (`deltatune export --merged --gguf`).

The reference is transformers' own GGUF loader reading the written file: it must give the adapted model's
outputs (the adapter on the same GGUF base, unmerged) to the rounding of the file's type, and keep the
base file's metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import deltatune

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.gguf import load_gguf_model  # noqa: E402
from deltatune.gguf.lora_export import GGUFExportError  # noqa: E402
from deltatune.gguf.merged_export import export_merged_gguf  # noqa: E402
from deltatune.train.cli import main  # noqa: E402
from test_gguf_base import tiny_llama, write_gguf, write_qwen2_gguf  # noqa: E402
from training_fixtures import save_float16_overflow, save_two_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}
"""Largest logit difference allowed, against an adapter effect of ~1 (f16 and q8_0 rounding of W + ΔW)."""


def adapted_and_base_logits(delta_model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed token ids, and the logits of `delta_model` on them with its adapter on and off."""
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = delta_model(input_ids=tokens).logits
        with delta_model.disabled():
            base = delta_model(input_ids=tokens).logits
    return tokens, adapted, base


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("merged")
    base_file = write_gguf(folder / "base.gguf", tiny_llama(seed=0, tied=True), metadata=lambda w: w.add_name("tiny"))
    torch.manual_seed(1)
    delta_model = deltatune.attach(
        load_gguf_model(base_file),
        deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    delta_model.save(str(folder / "adapter"))
    tokens, adapted, base = adapted_and_base_logits(delta_model)
    return base_file, folder / "adapter", tokens, adapted, base


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_merged_file_loads_in_transformers_with_the_adapted_outputs(tmp_path, base_and_adapter, dtype):
    base_file, adapter, tokens, adapted, base = base_and_adapter
    out = export_merged_gguf(base_file, adapter, tmp_path / "merged.gguf", dtype)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        found = reference(input_ids=tokens).logits
    assert (adapted - base).abs().max() > 0.5  # the adapter matters
    assert (found - adapted).abs().max() < TOLERANCE[dtype]
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.name"].contents() == "tiny"
    assert fields["general.file_type"].contents() == {"f16": 1, "q8_0": 7}[dtype]


def test_merged_export_command_needs_a_gguf_base(tmp_path, base_and_adapter, capsys):
    _, adapter, *_ = base_and_adapter
    with pytest.raises(GGUFExportError, match="convert_hf_to_gguf"):
        export_merged_gguf(tmp_path / "folder", adapter, tmp_path / "m.gguf")
    base_file = base_and_adapter[0]
    out = tmp_path / "m.gguf"
    assert main(["export", str(adapter), "--merged", "--gguf", str(out), "--base", str(base_file)]) == 0
    assert out.is_file() and "merged llama.cpp model written" in capsys.readouterr().out


def test_merged_export_refuses_a_folder_of_several_adapters_before_loading(
    tmp_path, base_and_adapter, monkeypatch, capsys
):
    """Merging would keep the active adapter (the first) and drop the others without a word; the plain export
    refuses such a folder with the same line."""
    import deltatune.gguf as gguf_package
    import deltatune.gguf.merged_export as merged_export

    base_file = base_and_adapter[0]
    adapters = save_two_adapters(load_gguf_model(base_file), tmp_path / "adapters")
    for module in (gguf_package, merged_export):
        monkeypatch.setattr(module, "load_gguf_model", lambda *args: pytest.fail("the model was loaded"))
    capsys.readouterr()  # what the setup printed
    for merged in (["--merged"], []):
        out = tmp_path / "out.gguf"
        assert main(["export", str(adapters), *merged, "--gguf", str(out), "--base", str(base_file)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds 2 adapters (a, b)" in err[0] and str(adapters / "a") in err[0], err
        assert sorted(path.name for path in tmp_path.iterdir()) == ["adapters"]


def test_merged_export_refuses_a_dtype_it_cannot_write_before_loading(tmp_path, base_and_adapter, monkeypatch, capsys):
    """f32 is an adapter file's type, not a merged file's: refused in one line before the base loads (minutes on
    a large model), whether the base exists or not."""
    import deltatune.gguf as gguf_package
    import deltatune.gguf.merged_export as merged_export

    base_file, adapter, *_ = base_and_adapter
    for module in (gguf_package, merged_export):
        monkeypatch.setattr(module, "load_gguf_model", lambda *args: pytest.fail("the model was loaded"))
    for base in (base_file, tmp_path / "missing.gguf"):
        out = tmp_path / "merged.gguf"
        command = ["export", str(adapter), "--merged", "--dtype", "f32", "--gguf", str(out), "--base", str(base)]
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a merged GGUF is written as f16 or q8_0, not 'f32'" in err[0], err
        assert not out.exists()


ALIGNED_NAMES = ("t" * 4, "t" * 20, "t" * 36, "t" * 52)
"""general.name values 16 bytes apart, spanning 48 bytes of header: at least one ends the header past a
multiple of 32 that is no multiple of 64, where a 32-byte padding and a 64-byte one part ways."""


@pytest.mark.parametrize("name", ALIGNED_NAMES, ids=len)
def test_a_base_with_its_own_alignment_gives_a_merged_file_laid_out_at_it(tmp_path, base_and_adapter, name):
    """A base written with general.alignment 64 (valid; the gguf package writes it): the merged file declares
    64 and lays its data out at 64, so the gguf package reads the same tensors as from the merge onto the
    same base at the default alignment, and deltatune loads it as the adapted model."""
    base_file, adapter, tokens, adapted, _ = base_and_adapter

    def metadata(writer) -> None:
        writer.add_custom_alignment(64)
        writer.add_name(name)

    aligned = write_gguf(tmp_path / "aligned.gguf", tiny_llama(seed=0, tied=True), metadata=metadata)
    out = export_merged_gguf(aligned, adapter, tmp_path / "merged.gguf", "f16")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.alignment"].contents() == 64 and reader.fields["general.name"].contents() == name
    assert all(tensor.data_offset % 64 == 0 for tensor in reader.tensors)
    reference = gguf.GGUFReader(str(export_merged_gguf(base_file, adapter, tmp_path / "reference.gguf", "f16")))
    found = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    assert list(found) == [tensor.name for tensor in reference.tensors]
    for tensor in reference.tensors:
        np.testing.assert_array_equal(found[tensor.name], np.array(tensor.data), err_msg=tensor.name)
    with torch.no_grad():
        logits = load_gguf_model(out)(input_ids=tokens).logits
    assert (logits - adapted).abs().max() < TOLERANCE["f16"]


def test_merged_f16_export_refuses_a_weight_past_float16s_range_and_writes_nothing(tmp_path, base_and_adapter):
    """The merge runs in float32, where 9e4 is finite; written as f16 it would be inf. A q8_0 block's scale
    (its largest value / 127) is a float16, so q8_0 holds it."""
    base_file = base_and_adapter[0]
    adapter = save_float16_overflow(load_gguf_model(base_file), "v_proj", tmp_path / "adapter")
    with pytest.raises(GGUFExportError, match=r"blk\.0\.attn_v\.weight.*q8_0") as refusal:
        export_merged_gguf(base_file, adapter, tmp_path / "merged.gguf", "f16")
    assert "\n" not in str(refusal.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    out = export_merged_gguf(base_file, adapter, tmp_path / "merged.gguf", "q8_0")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert merged.model.layers[0].self_attn.v_proj.weight[0, 0].item() == pytest.approx(9e4, rel=1e-2)


def _trained(base_file, config) -> deltatune.DeltaModel:
    """`config` on the GGUF base `base_file`, its parameters moved away from their start so that each one counts."""
    delta_model = deltatune.attach(load_gguf_model(base_file), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in delta_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return delta_model


BIAS_WITHOUT_A_TENSOR = {
    "lora_bias": lambda: deltatune.LoraConfig(r=4, target_modules=["o_proj"], lora_bias=True, init_lora_weights=False),
    "bitfit_add_missing_bias": lambda: deltatune.BitFitConfig(target_modules=["o_proj"], add_missing_bias=True),
}


@pytest.mark.parametrize("case", list(BIAS_WITHOUT_A_TENSOR))
def test_merged_export_refuses_a_trained_tensor_the_base_file_has_no_place_for(tmp_path, case):
    """A Llama file has no `attn_output.bias`: the merged bias would be left out and the file would compute
    the base model (BitFit) or a part of the adapter (lora_bias), so nothing is written."""
    base_file = write_gguf(tmp_path / "base.gguf", tiny_llama(seed=0, tied=False))
    _trained(base_file, BIAS_WITHOUT_A_TENSOR[case]()).save(str(tmp_path / "adapter"))
    with pytest.raises(GGUFExportError, match=r"blk\.0\.attn_output\.bias"):
        export_merged_gguf(base_file, tmp_path / "adapter", tmp_path / "merged.gguf", "f16")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "base.gguf"]


def test_trained_biases_the_base_file_holds_are_written_with_the_adapted_outputs(tmp_path):
    """A Qwen2 file holds q, k and v biases: BitFit's trained ones take their place, and transformers' GGUF
    loader reads back the adapted model."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    source = Qwen2ForCausalLM(Qwen2Config(**sizes, num_key_value_heads=2, tie_word_embeddings=True))
    base_file = write_qwen2_gguf(tmp_path / "qwen2.gguf", source, bias_first=True)
    delta_model = _trained(base_file, deltatune.BitFitConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    delta_model.save(str(tmp_path / "adapter"))
    tokens, adapted, base = adapted_and_base_logits(delta_model)
    (tmp_path / "out").mkdir()
    out = export_merged_gguf(base_file, tmp_path / "adapter", tmp_path / "out" / "merged.gguf", "f16")
    reference = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        found = reference(input_ids=tokens).logits
    assert (adapted - base).abs().max() > 0.5  # the adapter matters
    assert (found - adapted).abs().max() < TOLERANCE["f16"]
