"""GGUF bases with the linear weights kept in their quantized blocks (`deltatune.gguf`).

Every file here is a tiny Llama written in the test with the `gguf` package (F32 norms, quantized
linears and a Q8_0 token embedding tied to the head, as llama.cpp writes SmolLM2; one with its own Q8_0
head; a Qwen2 for the biases of quantized linears); the references are the
`gguf` package's own dequantization and transformers' own GGUF loader (`from_pretrained(...,
gguf_file=...)`, which dequantizes to float32). The weights both hold are the same numbers, so the models
agree to float32 rounding."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.errors import DeltaTuneError, MergeError

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.gguf import BLOCK_FORMATS, GGUFEmbedding, GGUFLinear, dequantize_rows, load_gguf_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

Q = gguf.GGMLQuantizationType
VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 96, 64, 4, 2, 2
LINEAR_TYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1}
"""The block type of each linear in the tiny file (the FFN is Q4_1, as in SmolLM2's file)."""


def tiny_llama(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 so that a misplaced norm would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The per-head row order llama.cpp's converter gives q and k (the inverse of transformers' undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _blocks(values: np.ndarray, kind: object) -> np.ndarray:
    """`values` quantized by gguf, or (a type gguf cannot quantize in numpy) random bytes of the right size."""
    try:
        return gguf.quants.quantize(values, kind)
    except NotImplementedError:
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        rows = values.shape[0]
        return np.random.default_rng(0).integers(0, 256, (rows, values.shape[1] // block_size * type_size), np.uint8)


def gguf_writer(path: Path, architecture: str, config: object) -> object:
    """A GGUF writer for `path` holding the metadata a decoder's config gives (sizes, heads, rope, norm)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}  # transformers 5 | 4.57
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    return writer


def write_gguf(
    path: Path, model: LlamaForCausalLM, types: dict[str, object] | None = None, metadata: Any = None
) -> Path:
    """`model` as a llama.cpp GGUF file: norms F32, the linears' block types from `types` (by GGUF name
    part; others Q4_1), token embedding Q8_0 and no output.weight where the head is tied (else a Q8_0
    output.weight), q and k rows in llama.cpp's order; `metadata(writer)`, where given, adds more keys."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    types = {**LINEAR_TYPES, **(types or {})}
    config = model.config
    writer = gguf_writer(path, "llama", config)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if metadata is not None:
        metadata(writer)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name.removesuffix(".weight")) + ".weight"
        values = tensor.float().numpy()
        if ".attn_q." in name:
            values = _llama_cpp_rows(values, config.num_attention_heads)
        if ".attn_k." in name:
            values = _llama_cpp_rows(values, config.num_key_value_heads)
        if values.ndim == 1:
            writer.add_tensor(name, values)
            continue
        kind = (
            Q.Q8_0
            if name in ("token_embd.weight", "output.weight")
            else next((t for p, t in types.items() if f".{p}." in name), Q.Q4_1)
        )
        writer.add_tensor(name, _blocks(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama())


def transformers_model(path: Path) -> LlamaForCausalLM:
    """transformers' own load of the file: every tensor dequantized to float32."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def token_ids(seed: int = 1, batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- block dequantization --------------------------------------------------------------------------------


def random_blocks(kind: object, rows: int, values: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks of a type gguf cannot quantize in numpy (K-quants): random bytes, with each
    fp16 scale field set to a finite random value."""
    layout = BLOCK_FORMATS[int(kind)]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * values // layout.block_size, layout.type_size), dtype=np.uint8)
    fp16_fields = {"Q4_K": (0, 2), "Q6_K": (208,)}[layout.name]
    for start in fp16_fields:
        blocks[:, start : start + 2] = rng.uniform(-0.1, 0.1, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [BLOCK_FORMATS[k].name for k in BLOCK_FORMATS])
def test_block_dequantization_equals_the_gguf_package(kind: str) -> None:
    qtype = Q[kind]
    values = np.random.default_rng(0).standard_normal((12, 512)).astype(np.float32)
    try:
        blocks = gguf.quants.quantize(values, qtype)
    except NotImplementedError:  # K-quants: gguf dequantizes them but quantizes only in C
        blocks = random_blocks(qtype, 12, 512)
    expected = gguf.quants.dequantize(blocks, qtype)
    ours = dequantize_rows(torch.from_numpy(blocks), int(qtype))
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours, torch.from_numpy(expected), atol=1e-6, rtol=0)


# --- the loaded model ------------------------------------------------------------------------------------


def test_linear_weights_stay_in_their_blocks(gguf_file: Path) -> None:
    model = load_gguf_model(gguf_file)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert len(linears) == 7 * LAYERS + 1 and all(isinstance(module, GGUFLinear) for module in linears.values())
    assert all(module.weight.dtype == torch.uint8 for module in linears.values())
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.type_name, attention.k_proj.type_name, attention.v_proj.type_name) == (
        "Q4_1",
        "Q4_0",
        "Q8_0",
    )
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, GGUFEmbedding) and embedding.type_name == "Q8_0"
    assert model.get_output_embeddings().weight is embedding.blocks  # the tied head reads the same blocks
    floats = {name for name, parameter in model.named_parameters() if parameter.is_floating_point()}
    assert floats and all("norm" in name for name in floats)  # no float copy of a quantized weight
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])


def test_logits_equal_transformers_gguf_loader(gguf_file: Path) -> None:
    ids = token_ids()
    with torch.no_grad():
        ours = load_gguf_model(gguf_file)(input_ids=ids).logits
        reference = transformers_model(gguf_file)(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def write_qwen2_gguf(path: Path, model: torch.nn.Module, bias_first: bool) -> Path:
    """A Qwen2 model (biased q, k, v) as a GGUF file: Q8_0 matrices, F32 vectors, the tensors in name order
    (each layer's `.bias` before its `.weight`, as a sorted file holds them) or with weights first."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    writer = gguf_writer(path, "qwen2", config)
    names = get_tensor_name_map(MODEL_ARCH.QWEN2, config.num_hidden_layers)
    tensors = {
        f"{names.get_name(hf_name.rpartition('.')[0])}.{hf_name.rpartition('.')[2]}": tensor.float().numpy()
        for hf_name, tensor in model.state_dict().items()
        if hf_name != "lm_head.weight"
    }
    for name in sorted(tensors, key=lambda name: (name.rpartition(".")[0], name.endswith(".weight") == bias_first)):
        values = tensors[name]
        if values.ndim == 1:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("bias_first", [True, False], ids=["bias-first", "weight-first"])
def test_quantized_linears_keep_their_bias_whichever_order_the_file_stores_them(
    bias_first: bool, tmp_path: Path
) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    source = Qwen2ForCausalLM(config)
    with torch.no_grad():  # biases far from zero so that a lost one shows
        for name, parameter in source.named_parameters():
            if name.endswith(".bias"):
                parameter.uniform_(-1, 1)
    path = write_qwen2_gguf(tmp_path / "qwen2.gguf", source, bias_first)
    ours = load_gguf_model(path)
    attention = ours.model.layers[0].self_attn
    for projection in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, projection)
        assert isinstance(layer, GGUFLinear) and layer.bias is not None and not layer.bias.requires_grad
        expected = getattr(source.model.layers[0].self_attn, projection).bias
        torch.testing.assert_close(layer.bias, expected.detach(), atol=0, rtol=0)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, transformers_model(path)(input_ids=ids).logits)


def test_input_gradient_equals_the_float32_model(gguf_file: Path) -> None:
    gradients = []
    for model in (load_gguf_model(gguf_file), transformers_model(gguf_file)):
        embeds = model.get_input_embeddings()(token_ids()).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().mean().backward()
        gradients.append(embeds.grad)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-5, rtol=1e-4)


def test_a_linear_in_row_chunks_equals_one_dequantized_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.gguf import linear

    weight = np.random.default_rng(3).standard_normal((40, 256)).astype(np.float32)
    layer = GGUFLinear(torch.from_numpy(gguf.quants.quantize(weight, Q.Q4_0)), int(Q.Q4_0), 256)
    x = torch.randn(2, 5, 256, requires_grad=True)
    dense = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, Q.Q4_0), Q.Q4_0))
    monkeypatch.setattr(linear, "TEMPORARY_VALUES", 256 * 7)  # chunks of 7 rows
    output = layer(x)
    output.sum().backward()
    torch.testing.assert_close(output, x.detach() @ dense.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 40) @ dense, atol=1e-5, rtol=1e-5)


# --- adapters on the blocks ------------------------------------------------------------------------------


def lora(**options: object) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **options})


def blocks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.dtype == torch.uint8}


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids(seed)).logits


def trains_with_the_blocks_unchanged(model: torch.nn.Module, steps: int, learning_rate: float) -> None:
    """`steps` AdamW steps on one batch lower the loss, and every block buffer stays bit-identical."""
    before = blocks(model.base_model)
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=learning_rate)
    ids = token_ids(2)
    losses = []
    for _ in range(steps):
        loss = deltatune.causal_lm_loss(model, ids, None, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-2
    after = blocks(model.base_model)
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_lora_trains_and_the_blocks_stay_bit_identical(gguf_file: Path) -> None:
    model = deltatune.attach(load_gguf_model(gguf_file), lora())
    assert len(model.targets["default"]) == 7 * LAYERS  # every linear but the tied head
    trains_with_the_blocks_unchanged(model, steps=8, learning_rate=1e-2)


def test_lora_equals_lora_on_the_dequantized_model_and_its_file_loads_there(gguf_file: Path, tmp_path: Path) -> None:
    model = deltatune.attach(load_gguf_model(gguf_file), lora(init_lora_weights=False))
    expected = logits(model)
    assert (expected - logits(load_gguf_model(gguf_file))).abs().max() > 1e-3
    model.save(str(tmp_path / "ours"))
    model.save(str(tmp_path / "peft"), format="peft")
    on_float32 = deltatune.load(transformers_model(gguf_file), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(on_float32), expected, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(transformers_model(gguf_file), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=1e-5)


def test_a_gguf_base_counts_its_logical_parameters_once(gguf_file: Path) -> None:
    """Blocks count as in × out parameters, the embedding and its tied head once, as on the float32 model."""
    ours = deltatune.attach(load_gguf_model(gguf_file), lora()).trainable_summary()
    reference = deltatune.attach(transformers_model(gguf_file), lora()).trainable_summary()
    assert (ours.trainable, ours.total) == (reference.trainable, reference.total)


def test_merge_into_blocks_is_refused_and_unload_dequantize_keeps_the_adapter(gguf_file: Path, tmp_path: Path) -> None:
    model = deltatune.attach(load_gguf_model(gguf_file), lora(init_lora_weights=False))
    unmerged = logits(model)
    with pytest.raises(
        MergeError, match=r"it is quantized \(GGUF Q4_1 blocks\).*unload\(merge=True, dequantize=True\)"
    ):
        model.merge()
    torch.testing.assert_close(logits(model), unmerged, atol=0, rtol=0)
    plain = model.unload(merge=True, dequantize=True)
    layer = plain.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    blocks = (GGUFLinear, GGUFEmbedding)
    assert not any(isinstance(module, blocks) for module in plain.modules())  # adapted or not: a float model
    merged = logits(plain)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() < 1e-4
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded), merged, atol=1e-5, rtol=1e-5)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def untied_gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with its own output head (a Q8_0 output.weight)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "untied-llama.gguf", tiny_llama(tied=False))


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_a_dequantized_gguf_model_reloads_with_from_pretrained_as_the_adapter_model(
    tied: bool, gguf_file: Path, untied_gguf_file: Path, tmp_path: Path
) -> None:
    from deltatune.requantize import dequantize_model

    model = deltatune.attach(load_gguf_model(gguf_file if tied else untied_gguf_file), lora(init_lora_weights=False))
    unmerged = logits(model)
    plain = dequantize_model(model.unload(merge=True, dequantize=True))
    embedding, head = plain.get_input_embeddings(), plain.get_output_embeddings()
    assert type(embedding) is torch.nn.Embedding and type(head) is torch.nn.Linear
    assert (head.weight is embedding.weight) == tied == plain.config.tie_word_embeddings
    assert not any(buffer.dtype == torch.uint8 for buffer in plain.buffers())
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert relative(logits(reloaded), unmerged) < 1e-5


def test_cli_merge_of_a_gguf_base_with_dequantize_reloads_as_the_adapter_model(
    untied_gguf_file: Path, tmp_path: Path
) -> None:
    from deltatune.train.cli import main

    model = deltatune.attach(load_gguf_model(untied_gguf_file), lora(init_lora_weights=False))
    unmerged = logits(model)
    model.save(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert (
        main(
            ["merge", str(untied_gguf_file), str(tmp_path / "adapter"), str(out), "--quantize", "gguf", "--dequantize"]
        )
        == 0
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert relative(logits(reloaded), unmerged) < 1e-5


def test_merging_lora_into_the_tied_gguf_head_is_refused_as_on_float32(gguf_file: Path) -> None:
    refusal = r"cannot merge into lm_head\.weight: it is tied to model\.embed_tokens\..* Untie them first"
    on_float32 = deltatune.attach(
        transformers_model(gguf_file), lora(target_modules=["lm_head"], init_lora_weights=False)
    )
    with pytest.raises(MergeError, match=refusal):
        on_float32.merge()
    model = deltatune.attach(load_gguf_model(gguf_file), lora(target_modules=["lm_head"], init_lora_weights=False))
    assert "lm_head" in model.targets["default"]
    before, unmerged = blocks(model.base_model), logits(model)
    for merge in (model.merge, lambda: model.unload(merge=True, dequantize=True)):
        with pytest.raises(MergeError, match=refusal):
            merge()
    assert all(torch.equal(before[name], buffer) for name, buffer in blocks(model.base_model).items())
    torch.testing.assert_close(logits(model), unmerged, atol=0, rtol=0)


METHODS = {
    "bitfit": lambda: deltatune.BitFitConfig(add_missing_bias=True),
    "prompt-tuning": lambda: deltatune.PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning": lambda: deltatune.PTuningConfig(num_virtual_tokens=4),
    "prefix-tuning": lambda: deltatune.PrefixTuningConfig(num_virtual_tokens=4),
    "bottleneck": lambda: deltatune.BottleneckConfig(),
    "compacter": lambda: deltatune.CompacterConfig(reduction_factor=8),
}


@pytest.mark.parametrize("method", METHODS)
def test_other_methods_train_on_the_blocks(method: str, gguf_file: Path) -> None:
    model = deltatune.attach(load_gguf_model(gguf_file), METHODS[method]())
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters("default"))
    trains_with_the_blocks_unchanged(model, steps=6, learning_rate=5e-2)


# --- bad input -------------------------------------------------------------------------------------------


def test_an_unsupported_block_type_names_the_type_the_tensor_and_what_is_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "iq4.gguf", tiny_llama(), {"attn_v": Q.IQ4_NL})
    message = r"tensor blk\.0\.attn_v\.weight is IQ4_NL, a type deltatune cannot keep quantized; supported: F32, .*Q4_0"
    with pytest.raises(DeltaTuneError, match=message):
        load_gguf_model(path)


def test_a_missing_gguf_package_is_one_line(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.gguf import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(DeltaTuneError, match=r"^loading a GGUF file needs the gguf package.*pip install gguf$"):
        load_gguf_model(gguf_file)


# --- the trainer: quantize: gguf -------------------------------------------------------------------------


def gguf_run_config(tmp_path: Path, gguf_file: Path, task: str = "causal-lm", **settings: object) -> Path:
    from training_fixtures import task_config, word_tokenizer

    tokenizer = tmp_path / "tokenizer"
    word_tokenizer(False).save_pretrained(tokenizer)
    return task_config(tmp_path, task, model=gguf_file, tokenizer=tokenizer, **settings)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_quantize_gguf_trains_on_the_files_blocks(task: str, gguf_file: Path, tmp_path: Path) -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train

    result = train(TrainConfig.from_yaml(gguf_run_config(tmp_path, gguf_file, task, quantize="gguf")), progress=False)
    trained = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(trained) == 6 and trained[-1] < trained[0]
    base = result.run.delta_model.base_model
    assert isinstance(base.model.layers[0].mlp.down_proj, GGUFLinear)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_gguf_file_without_quantize_loads_dequantized_by_transformers(gguf_file: Path, tmp_path: Path) -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import prepare_run

    run = prepare_run(TrainConfig.from_yaml(gguf_run_config(tmp_path, gguf_file)))
    layer = run.delta_model.base_model.model.layers[0].self_attn.q_proj
    assert not any(isinstance(module, GGUFLinear) for module in run.delta_model.base_model.modules())
    assert any(parameter.shape == (HIDDEN, HIDDEN) for parameter in layer.parameters())


def test_quantize_gguf_on_a_model_folder_says_it_needs_a_gguf_file(tmp_path: Path) -> None:
    from deltatune.train.models import load_model

    with pytest.raises(DeltaTuneError, match=r"quantize: gguf loads a GGUF file, and model '.*' is none"):
        load_model(str(tmp_path), quantize="gguf")


def test_quantize_gguf_without_the_gguf_package_is_one_line(monkeypatch: pytest.MonkeyPatch, gguf_file: Path) -> None:
    from deltatune.train import quantize
    from deltatune.train.models import load_model

    installed = quantize._installed
    monkeypatch.setattr(quantize, "_installed", lambda module: module != "gguf" and installed(module))
    with pytest.raises(DeltaTuneError, match=r"^quantize: gguf needs the gguf package, which is not installed"):
        load_model(str(gguf_file), quantize="gguf")
