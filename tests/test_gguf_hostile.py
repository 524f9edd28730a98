"""GGUF files whose header disagrees with itself or with its tensor table (`deltatune.gguf.loader` and the checks it
runs before a model is built): each is refused in one line naming the file and what is wrong, before anything
large is built, instead of loading as another model than the file holds or ending in a traceback. The files are
the tiny F32 Llama of `gguf_bytes`, one field at a time made hostile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.errors import DeltaTuneError  # noqa: E402
from deltatune.gguf import load_gguf_model  # noqa: E402
from deltatune.gguf.skeleton import parameters_on_meta  # noqa: E402
from gguf_bytes import (  # noqa: E402
    FLOAT32,
    HIDDEN,
    INT32,
    STRING,
    UINT32,
    tiny_metadata,
    tiny_tensors,
    write_tiny_gguf,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


class NeverBuilt:
    """A model class whose `from_config` fails the test: the file must be refused before a model is built."""

    @staticmethod
    def from_config(config: object) -> nn.Module:
        raise AssertionError(f"a model of {config.num_hidden_layers} layers was built before the header was checked")


def refusal(path: Path, **load_settings: object) -> str:
    """The one-line DeltaTuneError loading `path` gives, checked to start with the file's name."""
    with pytest.raises(DeltaTuneError) as error:
        load_gguf_model(path, **load_settings)
    message = str(error.value)
    assert "\n" not in message and message.startswith(path.name), message
    return message


def replaced(index: int, entry: tuple[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    table = tiny_tensors()
    table[index] = entry
    return table


# --- tensors the model would leave out ------------------------------------------------------------------


def test_a_table_of_two_blocks_with_a_block_count_of_one_is_refused_naming_both(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "layers.gguf", tensors=tiny_tensors(layers=2))
    message = refusal(path, model_class=NeverBuilt)
    assert "llama.block_count 1" in message and "2 blocks (blk.0 to blk.1)" in message


@pytest.mark.parametrize("count", [(UINT32, 0), (INT32, -1)], ids=["zero", "minus-one"])
def test_a_block_count_below_one_is_refused(tmp_path: Path, count: tuple[int, int]) -> None:
    path = write_tiny_gguf(tmp_path / "none.gguf", tiny_metadata(changes={"block_count": count}))
    message = refusal(path, model_class=NeverBuilt)
    assert f"llama.block_count is {count[1]}, not a positive whole number" in message


def test_a_tensor_the_model_has_no_place_for_is_refused_naming_it(tmp_path: Path) -> None:
    """A q bias, which llama.cpp's llama graph uses and the bias-free transformers Llama would drop."""
    path = write_tiny_gguf(tmp_path / "bias.gguf", tensors=tiny_tensors() + [("blk.0.attn_q.bias", (HIDDEN,))])
    message = refusal(path)
    assert "1 tensor the LlamaForCausalLM built from its metadata has no place for: blk.0.attn_q.bias" in message


def test_the_unused_tensors_are_counted_and_the_first_named(tmp_path: Path) -> None:
    extra = [(f"blk.0.attn_{part}.bias", (HIDDEN,)) for part in "qkvo"]
    message = refusal(write_tiny_gguf(tmp_path / "biases.gguf", tensors=tiny_tensors() + extra))
    assert "4 tensors" in message and "blk.0.attn_q.bias, blk.0.attn_k.bias, blk.0.attn_v.bias, ..." in message


def test_rope_frequencies_the_model_computes_itself_are_not_refused(tmp_path: Path) -> None:
    plain = load_gguf_model(write_tiny_gguf(tmp_path / "plain.gguf"))
    path = write_tiny_gguf(tmp_path / "rope.gguf", tensors=tiny_tensors() + [("rope_freqs.weight", (4,))])
    model = load_gguf_model(path)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_tensor_the_model_leaves_out_must_still_lie_inside_the_file(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "cut.gguf", tensors=tiny_tensors() + [("rope_freqs.weight", (4,))])
    path.write_bytes(path.read_bytes()[:-24])  # its padding (16 bytes) and half its values
    assert "ends inside tensor rope_freqs.weight; the file is truncated" in refusal(path, model_class=NeverBuilt)


def test_a_classifier_built_from_a_file_with_its_own_head_leaves_the_head_out(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    path = write_tiny_gguf(tmp_path / "head.gguf", tensors=tiny_tensors() + [("output.weight", (32, HIDDEN))])
    causal = load_gguf_model(path)
    assert not causal.config.tie_word_embeddings
    classifier, info = load_gguf_model(path, AutoModelForSequenceClassification, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == ["score.weight"] and classifier.score.weight.shape == (3, HIDDEN)


# --- counts and sizes checked against the tensor table before the model is built ---------------------------


SIZE_MISMATCHES = {
    "block_count-2**32-1": ({"block_count": (UINT32, 2**32 - 1)}, "llama.block_count 4294967295", "1 block (blk.0)"),
    "block_count-3": ({"block_count": (UINT32, 3)}, "llama.block_count 3", "1 block (blk.0)"),
    "embedding_length-2**31": (
        {"embedding_length": (UINT32, 2**31)},
        "llama.embedding_length 2147483648",
        "token_embd.weight is (32, 16)",
    ),
    "vocab_size": ({"vocab_size": (UINT32, 64)}, "llama.vocab_size 64", "token_embd.weight is (32, 16)"),
    "feed_forward_length": (
        {"feed_forward_length": (UINT32, 48)},
        "llama.feed_forward_length 48",
        "blk.0.ffn_up.weight is (32, 16)",
    ),
}


@pytest.mark.parametrize("case", SIZE_MISMATCHES)
def test_a_count_or_size_the_tensor_table_contradicts_is_refused_before_the_model_is_built(
    tmp_path: Path, case: str
) -> None:
    changes, declared, found = SIZE_MISMATCHES[case]
    path = write_tiny_gguf(tmp_path / "sizes.gguf", tiny_metadata(changes=changes))
    message = refusal(path, model_class=NeverBuilt)
    assert declared in message and found in message and "does not match" in message


@pytest.mark.parametrize(
    ("part", "default"), [("embedding_length", "hidden_size 4096"), ("block_count", "num_hidden_layers 32")]
)
def test_a_missing_size_key_is_blamed_on_the_key(tmp_path: Path, part: str, default: str) -> None:
    path = write_tiny_gguf(tmp_path / "unsized.gguf", tiny_metadata(changes={part: None}))
    message = refusal(path, model_class=NeverBuilt)
    assert f"has no llama.{part} in its metadata" in message and default in message


# --- values that would end in a traceback -------------------------------------------------------------------


HOSTILE_HEADERS = {
    "zero-dim-tensor": ({"tensors": replaced(1, ("output_norm.weight", ()))}, "output_norm.weight declares no dim"),
    "q-rows-below-heads": ({"tensors": replaced(3, ("blk.0.attn_q.weight", (2, 16)))}, "blk.0.attn_q.weight"),
    "k-rows-below-heads": ({"tensors": replaced(4, ("blk.0.attn_k.weight", (1, 16)))}, "blk.0.attn_k.weight"),
    "head-count-0": ({"changes": {"attention.head_count": (UINT32, 0)}}, "llama.attention.head_count is 0"),
    "head-count-kv-0": ({"changes": {"attention.head_count_kv": (UINT32, 0)}}, "llama.attention.head_count_kv is 0"),
    "head-count-3": (
        {"changes": {"attention.head_count": (UINT32, 3)}},
        "llama.attention.head_count 3 does not divide llama.embedding_length 16",
    ),
    "head-count-kv-3": (
        {"changes": {"attention.head_count": (UINT32, 4), "attention.head_count_kv": (UINT32, 3)}},
        "llama.attention.head_count_kv 3 does not divide llama.attention.head_count 4",
    ),
    "head-width-odd": (
        {"changes": {"attention.head_count": (UINT32, 16), "attention.head_count_kv": (UINT32, 8)}},
        "blk.0.attn_q.weight has 16 rows, not an even number for each of its 16 heads",
    ),
    "embedding-length-text": ({"changes": {"embedding_length": (STRING, "16")}}, "llama.embedding_length is '16'"),
    "embedding-length-float": ({"changes": {"embedding_length": (FLOAT32, 16.0)}}, "llama.embedding_length is 16.0"),
    "architecture-unknown": ({"architecture": "foobar"}, "foobar"),
    "architecture-transformers-cannot-build": ({"architecture": "gptneox"}, "transformers"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_a_hostile_header_is_one_error_naming_the_file_and_what_is_wrong(tmp_path: Path, case: str) -> None:
    settings, said = HOSTILE_HEADERS[case]
    metadata = tiny_metadata(settings.get("architecture", "llama"), settings.get("changes"))
    path = write_tiny_gguf(tmp_path / "hostile.gguf", metadata, settings.get("tensors"))
    assert said in refusal(path)


def test_the_skeleton_allocates_nothing_for_its_parameters() -> None:
    """A 2**22 × 2**22 linear (64 TiB of float32) built inside `parameters_on_meta` gets a meta weight, and no
    allocation of it is tried."""
    with parameters_on_meta():
        layer = nn.Linear(2**22, 2**22)
        norm = nn.LayerNorm(2**22)
    assert layer.weight.is_meta and layer.bias.is_meta and norm.weight.is_meta
