"""Reading a GGUF file once (`deltatune.gguf.header`, `.config`, `.names`): the header, the config and the
tensor-name map equal what the `gguf` package and transformers give for the same file, and the loaded
tensors are views of the file's copy-on-write map (nothing copied in, nothing written back)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.errors import DeltaTuneError  # noqa: E402
from deltatune.gguf import load_gguf_model  # noqa: E402
from deltatune.gguf.config import gguf_config, uses_plain_config  # noqa: E402
from deltatune.gguf.header import read_header  # noqa: E402
from deltatune.gguf.names import gguf_tensor_names  # noqa: E402
from gguf_bytes import FLOAT32, STRING, UINT32, UINT64, gguf_bytes, metadata_entry, text, tiny_metadata, write_tiny_gguf  # noqa: E402
from test_gguf_base import tiny_llama, write_gguf, write_qwen2_gguf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TOKENS = [f"t{index}" for index in range(96)]


def _tokenizer(name: str = "tiny llama"):
    def add(writer) -> None:
        writer.add_name(name)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_merges(["t 1", "t 2", "t1 0"])
        writer.add_token_types([1] * len(TOKENS))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)

    return add


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "own-head"])
def llama_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(path, tiny_llama(tied=request.param), metadata=_tokenizer())


@pytest.fixture(scope="module")
def qwen2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return write_qwen2_gguf(tmp_path_factory.mktemp("gguf") / "qwen2.gguf", Qwen2ForCausalLM(config), True)


def test_header_holds_what_the_gguf_package_reads(llama_file: Path) -> None:
    header = read_header(llama_file)
    reader = gguf.GGUFReader(str(llama_file))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            assert header.string_arrays[key] == len(field.data) and key not in header.metadata
        else:
            assert header.metadata[key] == field.contents()
    assert header.string_arrays["tokenizer.ggml.tokens"] == len(TOKENS)
    assert [(t.name, t.shape, t.ggml_type) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type)) for t in reader.tensors
    ]
    assert [t.start for t in header.tensors] == [int(t.data_offset) for t in reader.tensors]


@pytest.mark.parametrize("settings", [{}, {"num_labels": 3}], ids=["causal", "labels"])
def test_config_equals_transformers_gguf_config(llama_file: Path, qwen2_file: Path, settings: dict) -> None:
    from transformers import AutoConfig

    for path in (llama_file, qwen2_file):
        header = read_header(path)
        assert uses_plain_config(header)
        ours = gguf_config(header, path, **settings).to_dict()
        reference = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **settings).to_dict()
        ours.pop("_name_or_path"), reference.pop("_name_or_path")  # the loader sets it to the file's path
        assert ours == reference


def test_a_llama_file_of_a_mistral_gets_transformers_config(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = write_gguf(tmp_path / "mistral.gguf", tiny_llama(), metadata=_tokenizer("mistral"))
    header = read_header(path)
    assert not uses_plain_config(header)
    reference = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert reference.model_type == "mistral" and gguf_config(header, path).model_type == "mistral"


@pytest.mark.parametrize("task", ["causal", "classification"])
def test_tensor_names_equal_transformers_map(llama_file: Path, task: str) -> None:
    import inspect

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    header = read_header(llama_file)
    model_class = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
    model = model_class.from_config(gguf_config(header, llama_file, num_labels=2))
    if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters:  # transformers 5; 4.57 takes none
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor

        reference = get_gguf_hf_weights_map(model, TensorProcessor())
    else:
        reference = get_gguf_hf_weights_map(model)
    assert gguf_tensor_names(model, header.architecture) == reference


def _file_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[5]) == path.resolve():
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_blocks_and_float_tensors_are_views_of_the_file(llama_file: Path) -> None:
    model = load_gguf_model(llama_file)
    ranges = _file_ranges(llama_file)
    layer = model.model.layers[0]
    for tensor in (layer.self_attn.v_proj.weight, layer.mlp.down_proj.weight, layer.input_layernorm.weight):
        assert any(start <= tensor.data_ptr() < end for start, end in ranges)
    assert layer.self_attn.v_proj.weight.dtype == torch.uint8 and layer.input_layernorm.weight.dtype == torch.float32


def test_writes_to_the_loaded_tensors_never_reach_the_file(llama_file: Path) -> None:
    digest = hashlib.sha256(llama_file.read_bytes()).hexdigest()
    model = load_gguf_model(llama_file)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.add_(1.0)
        model.model.layers[0].mlp.down_proj.weight.zero_()
    del model
    assert hashlib.sha256(llama_file.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("damage", ["truncated", "not-gguf"])
def test_a_damaged_file_is_refused_in_one_line(llama_file: Path, tmp_path: Path, damage: str) -> None:
    data = llama_file.read_bytes()
    path = tmp_path / "damaged.gguf"
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"JUNK" + data[4:])
    with pytest.raises(DeltaTuneError, match="truncated" if damage == "truncated" else "not a GGUF file") as error:
        load_gguf_model(path)
    assert "\n" not in str(error.value)


ARCHITECTURE = metadata_entry("general.architecture", STRING, "llama")
MALFORMED_HEADERS = {
    "empty": (b"", "holds 0 bytes"),
    "string-past-the-end": (gguf_bytes([struct.pack("<Q", 2**40) + b"general"], []), "past its end"),
    "key-not-utf8": (gguf_bytes([text(b"\xff\xfe") + struct.pack("<II", UINT32, 1)], []), "not UTF-8"),
    "alignment-zero": (
        gguf_bytes([ARCHITECTURE, metadata_entry("general.alignment", UINT32, 0)], []),
        "general.alignment 0",
    ),
    "alignment-text": (
        gguf_bytes([ARCHITECTURE, metadata_entry("general.alignment", STRING, "32")], []),
        "general.alignment '32'",
    ),
    "alignment-not-a-power-of-two": (
        gguf_bytes([ARCHITECTURE, metadata_entry("general.alignment", UINT32, 48)], []),
        "general.alignment 48, not a power of two",
    ),
    "alignment-2**63": (
        gguf_bytes([ARCHITECTURE, metadata_entry("general.alignment", UINT64, 2**63 + 1)], []),
        f"general.alignment {2**63 + 1}, not a power of two",
    ),
    "architecture-a-number": (
        gguf_bytes([metadata_entry("general.architecture", UINT32, 7)], []),
        "no general.architecture name",
    ),
}


@pytest.mark.parametrize("damage", MALFORMED_HEADERS)
def test_a_malformed_header_is_refused_in_one_line_saying_what_is_wrong(tmp_path: Path, damage: str) -> None:
    data, said = MALFORMED_HEADERS[damage]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(data)
    with pytest.raises(DeltaTuneError) as error:
        read_header(path)
    assert said in str(error.value) and "\n" not in str(error.value)


def test_a_float_tensor_of_another_shape_than_the_model_expects_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    model.model.norm.weight = torch.nn.Parameter(torch.ones(1))  # 1 value where hidden_size are expected
    path = write_gguf(tmp_path / "bad-norm.gguf", model)
    with pytest.raises(DeltaTuneError, match=r"output_norm|model\.norm\.weight.*\(1,\).*\(64,\)"):
        load_gguf_model(path)


def test_a_file_naming_a_tensor_twice_is_refused_as_the_gguf_package_refuses_it(tmp_path: Path) -> None:
    """A second `output_norm.weight` in the table (written under another name of its length, then renamed): the
    gguf package refuses the file, and so does the loader, naming the tensor and the file, instead of taking
    one of the two copies."""
    model = tiny_llama()
    stand_in = "output_norm.weighX"
    extra = lambda writer: writer.add_tensor(stand_in, torch.full((64,), 7.0).numpy())  # noqa: E731
    path = write_gguf(tmp_path / "twice.gguf", model, metadata=extra)
    data = path.read_bytes()
    assert data.count(stand_in.encode()) == 1
    path.write_bytes(data.replace(stand_in.encode(), b"output_norm.weight"))
    with pytest.raises(ValueError, match="duplicated tensor"):
        gguf.GGUFReader(str(path))
    with pytest.raises(DeltaTuneError, match=r"^twice\.gguf names the tensor output_norm\.weight twice") as error:
        load_gguf_model(path)
    assert "\n" not in str(error.value)


def test_a_file_giving_a_metadata_key_twice_is_refused_as_the_gguf_package_refuses_it(tmp_path: Path) -> None:
    """llama.rope.freq_base given twice (10000, then 500000): the gguf package refuses the file, and so does the
    loader, naming the key and the file, instead of taking the last value."""
    metadata = tiny_metadata() + [metadata_entry("llama.rope.freq_base", FLOAT32, 500000.0)]
    path = write_tiny_gguf(tmp_path / "twice.gguf", metadata)
    with pytest.raises(KeyError, match="Duplicate llama.rope.freq_base"):
        gguf.GGUFReader(str(path))
    with pytest.raises(
        DeltaTuneError, match=r"^twice\.gguf gives the metadata key llama\.rope\.freq_base twice"
    ) as error:
        load_gguf_model(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_quantized_embedding_of_another_width_than_the_model_is_refused_at_load(tmp_path: Path, tied: bool) -> None:
    """A Q8_0 token_embd of 32 values a row in a file whose metadata makes the model 64 wide: refused at load,
    before the model is built, naming the file, the key, its value and the tensor's shape, not at the first
    forward."""
    model = tiny_llama(tied=tied)
    model.model.embed_tokens = torch.nn.Embedding(model.config.vocab_size, 32)
    path = write_gguf(tmp_path / "narrow.gguf", model)
    with pytest.raises(
        DeltaTuneError, match=r"^narrow\.gguf: .*llama\.embedding_length 64, but token_embd\.weight is \(96, 32\)"
    ) as err:
        load_gguf_model(path)
    assert "\n" not in str(err.value)


def test_a_quantized_linear_of_another_width_than_the_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(64, 64, bias=False)  # 64 inputs where 128 are expected
    path = write_gguf(tmp_path / "narrow.gguf", model)
    with pytest.raises(
        DeltaTuneError, match=r"^narrow\.gguf: tensor blk\.0\.ffn_down\.weight .*\(64, 64\).*\(64, 128\)"
    ):
        load_gguf_model(path)


def test_a_quantized_tensor_whose_rows_are_not_whole_blocks_is_refused_naming_it(tmp_path: Path) -> None:
    """blk.0.ffn_down.weight's first dimension (values a row, fastest first) patched from 128 to 100 in the table:
    rows of 100 Q4_1 values are no whole number of blocks of 32."""
    path = write_gguf(tmp_path / "ragged.gguf", tiny_llama())
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    first_dimension = data.index(text(name)) + len(text(name)) + 4  # after the name and the number of dimensions
    assert struct.unpack_from("<Q", data, first_dimension) == (128,)
    struct.pack_into("<Q", data, first_dimension, 100)
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaTuneError, match=r"^ragged\.gguf: tensor blk\.0\.ffn_down\.weight declares rows of 100"):
        load_gguf_model(path)
