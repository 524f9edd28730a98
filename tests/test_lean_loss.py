"""The memory-lean language-model loss (`deltatune.chunked_loss`) and gradient checkpointing on
quantized bases.

The lean loss computes the output head and cross-entropy over the labelled rows a chunk at a time and
recomputes each chunk in backward. Its loss and gradients equal transformers' own loss (the model's
forward with `labels`, which builds every position's logits) to float32 rounding, on causal models
(Llama, GPT-2), T5 (scaling before the head), tied heads, LoRA on the head, a trained copy of the head,
an nf4 base and a GGUF tied head; what the model does after its head (Gemma 2's soft-capping) is kept,
and a transform it does not know is detected on the model's own row and computed the plain way. No
tensor of N × V elements is created in forward or backward (a dispatch mode sees every tensor made).

Gradient checkpointing (`DeltaModel.gradient_checkpointing_enable`, reentrant or not) gives the LoRA
gradients of the run without it on every quantized base and on a GGUF base."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune import chunked_loss
from deltatune.losses import causal_lm_batch_loss, causal_lm_loss, loss_chunk_rows, seq2seq_lm_loss
from test_quantized import KINDS, load, saved  # noqa: F401 (saved: the fixture of the saved tiny models)
from tiny_models import VOCAB, build, llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CHUNK = 8
"""Rows per chunk in these tests: the batches have 40-odd labelled rows, so several chunks and a rest."""


def lm_batch(seed: int = 0, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """Token ids with prompt positions (-100 labels) and right padding on two rows."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    attention_mask[3, -5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_gradients(model: torch.nn.Module, compute: Callable[[], torch.Tensor]) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), gradients


def assert_same(actual: tuple[float, dict], expected: tuple[float, dict]) -> None:
    assert abs(actual[0] - expected[0]) <= 1e-5, (actual[0], expected[0])
    assert actual[1].keys() == expected[1].keys() and expected[1]
    for name, gradient in expected[1].items():
        torch.testing.assert_close(actual[1][name], gradient, atol=1e-5, rtol=0, msg=name)


def tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**llama().config.to_dict() | {"tie_word_embeddings": True}))


def gguf_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The tiny GGUF Llama of test_gguf_base (Q8_0 embedding tied to the head), with LoRA."""
    pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")
    from deltatune.gguf import load_gguf_model

    folder: Path = request.getfixturevalue("tmp_path")
    from test_gguf_base import tiny_llama, write_gguf

    model = load_gguf_model(write_gguf(folder / "tiny.gguf", tiny_llama())).train()
    return with_lora(model, "all-linear")


def with_lora(model: torch.nn.Module, targets: list[str] | str, **options: object) -> torch.nn.Module:
    torch.manual_seed(1)
    return deltatune.attach(
        model, deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
    )


def nf4_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install deltatune[quantized])")
    return with_lora(build("llama-nf4").train(), "all-linear")


CAUSAL_MODELS: dict[str, Callable[[pytest.FixtureRequest], torch.nn.Module]] = {
    "llama": lambda request: build("llama"),
    "llama-tied-head": lambda request: tied_llama(),
    "gpt2": lambda request: build("gpt2"),
    "lora-on-the-head": lambda request: with_lora(build("llama"), ["q_proj", "lm_head"]),
    "lora-on-a-tied-head": lambda request: with_lora(build("gpt2"), ["c_attn", "lm_head"]),
    "trained-copy-of-the-head": lambda request: with_lora(build("llama"), ["q_proj"], modules_to_save=["lm_head"]),
    "nf4-base": nf4_model,
    "gguf-tied-head": gguf_model,
}
"""Models without an adapter train every parameter (the tied embedding's gradient is the head's plus the
input's); with one, only the adapter's."""


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_chunked_causal_loss_and_gradients_equal_the_models_own_loss(name: str, request) -> None:
    model = CAUSAL_MODELS[name](request)
    batch = lm_batch()
    expected = loss_and_gradients(model, lambda: model(**batch).loss)
    assert_same(loss_and_gradients(model, lambda: causal_lm_loss(model, *batch.values(), chunk_rows=CHUNK)), expected)


def test_chunked_seq2seq_loss_and_gradients_equal_the_models_own_loss_with_t5s_scaling_before_the_head() -> None:
    model = build("t5")
    assert model.config.tie_word_embeddings  # T5 scales the decoder output by d^-0.5 before a tied head
    batch = lm_batch(length=9)
    expected = loss_and_gradients(model, lambda: model(**batch).loss)
    with loss_chunk_rows(CHUNK):
        assert_same(loss_and_gradients(model, lambda: seq2seq_lm_loss(model, batch)), expected)


def gemma2(soft_cap: float) -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=soft_cap,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config)


SOFT_CAP = 0.05
"""Small enough for the tiny model's logits (|logits| ~ 0.1) that the cap changes the loss."""


def test_gemma2s_soft_capping_after_the_head_is_kept() -> None:
    model, batch = gemma2(SOFT_CAP), lm_batch()
    expected = loss_and_gradients(model, lambda: model(**batch).loss)
    with torch.no_grad():
        uncapped = gemma2(None)(**batch).loss
    assert abs(float(uncapped) - expected[0]) > 1e-2  # the cap matters here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known from the config: chunked, no fallback
        assert_same(
            loss_and_gradients(model, lambda: causal_lm_loss(model, *batch.values(), chunk_rows=CHUNK)), expected
        )


def test_an_unknown_transform_after_the_head_is_detected_and_the_loss_computed_plainly(monkeypatch) -> None:
    monkeypatch.setattr(chunked_loss, "LOGIT_TRANSFORMS", {})  # the soft-cap unknown: the row check must see it
    model, batch = gemma2(SOFT_CAP), lm_batch()
    expected = loss_and_gradients(model, lambda: model(**batch).loss)
    with pytest.warns(UserWarning, match="changes its logits after the output head"):
        assert_same(
            loss_and_gradients(model, lambda: causal_lm_loss(model, *batch.values(), chunk_rows=CHUNK)), expected
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model; later calls go the plain way directly
        assert_same(
            loss_and_gradients(model, lambda: causal_lm_loss(model, *batch.values(), chunk_rows=CHUNK)), expected
        )


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        output = func(*args, **(kwargs or {}))
        sizes = [tensor.numel() for tensor in tree_leaves(output) if isinstance(tensor, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return output


def largest_tensor_of_a_step(step: Callable[[], torch.Tensor]) -> int:
    with LargestTensor() as seen:
        step().backward()
    return seen.largest


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["lora", "lora-on-the-head"])
def test_a_lean_step_never_creates_a_tensor_of_all_labelled_rows_times_the_vocabulary(targets: list[str]) -> None:
    model = with_lora(build("llama"), targets)
    batch = lm_batch(batch=8)
    rows = int((batch["labels"][:, 1:] != -100).sum())
    assert rows > model.config.hidden_size  # so the head's weight (V × d) is smaller than N × V
    with loss_chunk_rows(CHUNK):
        lean = largest_tensor_of_a_step(lambda: causal_lm_batch_loss(model, batch))
    with loss_chunk_rows(None):
        plain = largest_tensor_of_a_step(lambda: causal_lm_batch_loss(model, batch))
    assert plain >= rows * VOCAB  # the counter sees the plain loss's logits
    assert lean < rows * VOCAB, (lean, rows * VOCAB)


def test_the_trainer_computes_the_loss_in_chunks_of_its_loss_chunk_rows(tmp_path, monkeypatch) -> None:
    from deltatune.train.cli import main
    from training_fixtures import task_config

    seen: list[int] = []
    original = chunked_loss.chunked_cross_entropy

    def spy(head, rows, targets, chunk_rows, transform):  # noqa: ANN001, ANN202
        seen.append(chunk_rows)
        return original(head, rows, targets, chunk_rows, transform)

    monkeypatch.setattr("deltatune.losses.chunked_cross_entropy", spy)
    config = task_config(tmp_path, "causal-lm", max_steps=2, eval_file=None)
    assert main(["train", str(config), "--quiet", "loss_chunk_rows=3"]) == 0
    assert seen == [3, 3]
    assert main(["train", str(config), "--quiet", "loss_chunk_rows=null", "overwrite_output_dir=true"]) == 0
    assert seen == [3, 3]


def test_loss_chunk_rows_changes_float_rounding_only_so_a_resume_may_change_it(tmp_path) -> None:
    """As `threads`: a checkpoint of the plain loss (one written before the chunked loss existed
    computed it so) resumes with the chunked default, and a chunked one with another chunk."""
    from deltatune.train.cli import main
    from test_train_run_identity import interrupted_run

    config, out = interrupted_run(tmp_path)
    assert main(["train", str(config), "--quiet", "--resume", "loss_chunk_rows=4"]) == 0
    assert (out / "adapter").is_dir()


def test_chunked_cross_entropy_equals_torchs_on_the_whole_logits() -> None:
    head = torch.nn.Linear(16, 50)
    rows, targets = torch.randn(37, 16, requires_grad=True), torch.randint(0, 50, (37,))
    expected = F.cross_entropy(head(rows), targets)
    (expected_gradient,) = torch.autograd.grad(expected, rows)
    actual = chunked_loss.chunked_cross_entropy(head, rows, targets, chunk_rows=5)
    (actual_gradient,) = torch.autograd.grad(actual, rows)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual_gradient, expected_gradient, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- gradient checkpointing
def lora_gradients_with_checkpointing(
    base: Callable[[], torch.nn.Module], checkpointing: dict | None
) -> tuple[dict, int]:
    """The LoRA gradients of one lean loss on `base()` prepared as the trainer prepares it, with
    checkpointing (its kwargs) or without (None); and how often the first decoder layer's MLP ran
    (transformers 5 checkpoints a layer's `forward`, so the hooks of the layer itself run once)."""
    model = base()
    deltatune.prepare_quantized_base(model, gradient_checkpointing=checkpointing is not None)
    model = with_lora(model, "all-linear").train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(checkpointing)
    calls = []
    model.base_model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    batch = lm_batch()
    _, gradients = loss_and_gradients(model, lambda: causal_lm_batch_loss(model, batch))
    return gradients, len(calls)


CHECKPOINTING = [{"use_reentrant": False}, {"use_reentrant": True}]


def assert_checkpointing_keeps_the_gradients(base: Callable[[], torch.nn.Module], checkpointing: dict) -> None:
    expected, plain_calls = lora_gradients_with_checkpointing(base, None)
    actual, calls = lora_gradients_with_checkpointing(base, checkpointing)
    assert (plain_calls, calls) == (1, 2)  # the checkpointed layer ran again in backward
    assert actual.keys() == expected.keys() and len(expected) == 28  # A and B of 14 layers
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_keeps_the_lora_gradients_on_a_quantized_base(saved, kind: str, checkpointing) -> None:  # noqa: F811
    assert_checkpointing_keeps_the_gradients(lambda: load(saved, "llama", kind), checkpointing)


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_keeps_the_lora_gradients_on_a_gguf_base(tmp_path, checkpointing) -> None:
    pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")
    from deltatune.gguf import load_gguf_model
    from test_gguf_base import tiny_llama, write_gguf

    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama())
    assert_checkpointing_keeps_the_gradients(lambda: load_gguf_model(path).train(), checkpointing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_cross_entropy_and_its_gradient_equal_torchs(dtype: torch.dtype) -> None:
    logits = (4 * torch.randn(23, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (23,))
    expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    actual = chunked_loss.SummedCrossEntropy.apply(logits, targets)
    (actual_gradient,) = torch.autograd.grad(2.5 * actual, logits)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-6)
    assert actual_gradient.dtype == dtype
    torch.testing.assert_close(actual_gradient.float(), 2.5 * expected_gradient.float(), atol=1e-6, rtol=1e-2)


class LogitSizedTensors(TorchDispatchMode):
    """Counts the distinct tensors of `numel` elements that operators return (in-place results once)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.numel() == self.numel:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return output


def logit_sized_tensors_of_a_chunks_backward(loss_of_logits: Callable[[torch.Tensor], torch.Tensor]) -> int:
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    rows = torch.randn(8, 16, requires_grad=True)
    loss = loss_of_logits(head(rows))
    with LogitSizedTensors(8 * 50) as seen:
        loss.backward()
    return len(seen.storages)


def test_a_chunks_backward_makes_one_logit_sized_tensor_where_torchs_cross_entropy_makes_several() -> None:
    plain = logit_sized_tensors_of_a_chunks_backward(lambda z: F.cross_entropy(z, z.new_zeros(8, dtype=torch.long)))
    lean = logit_sized_tensors_of_a_chunks_backward(
        lambda z: chunked_loss.SummedCrossEntropy.apply(z, z.new_zeros(8, dtype=torch.long))
    )
    assert lean == 1 and plain >= 2, (lean, plain)  # torch 2.13: 3
