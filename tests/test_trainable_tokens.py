"""Trainable tokens, as a method (peft's TRAINABLE_TOKENS) and as LoRA's `trainable_token_indices`,
against peft 0.21 with the same weights (outputs within 1e-5, folders both ways, merges), and against
the plain computation: the base model with those embedding rows overwritten (for a tied head, the
head's rows with them). Tiny Llama with a tied head (as SmolLM2), GPT-2 (tied) and BERT (no head).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.train.checkpoint import ADAPTER_FOLDER
from deltatune.train.cli import main
from resume_checks import (
    RESUME_SETTINGS,
    assert_resume_equals_the_uninterrupted_run,
    assert_resume_with_a_switched_setting_is_refused,
)
from tiny_models import VOCAB, build, token_inputs
from training_fixtures import SPECIALS, VOCAB_SIZE, task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TOKENS = list(range(10, 60))
"""Enough tokens that every input row holds some."""
ARCHS = ["llama-tied", "gpt2", "bert"]
EMBEDDING = {"llama-tied": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "bert.embeddings.word_embeddings"}
KINDS = ["trainable_tokens", "lora"]
WORD_IDS = list(range(len(SPECIALS), VOCAB_SIZE))
"""The ids of the training fixtures' words (their tokenizer's vocabulary after the special tokens)."""


def tied_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def base(arch: str) -> nn.Module:
    return tied_llama() if arch == "llama-tied" else build(arch)


def run(model: nn.Module, seed: int = 1, **kwargs) -> torch.Tensor:
    return model(**token_inputs(seed), **kwargs).logits


def peft_config(kind: str, arch: str):
    if kind == "trainable_tokens":
        return peft.TrainableTokensConfig(token_indices=list(TOKENS), init_weights=False)
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"] if arch == "llama-tied" else ["c_attn"]
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, trainable_token_indices=list(TOKENS))


def our_config(kind: str, arch: str) -> deltatune.DeltaConfig:
    if kind == "trainable_tokens":
        return deltatune.TrainableTokensConfig(token_indices=list(TOKENS), init_weights=False)
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"] if arch == "llama-tied" else ["c_attn"]
    return deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, trainable_token_indices=list(TOKENS), init_lora_weights=False
    )


def perturbed(parameters) -> None:
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.1 * torch.randn_like(parameter))


def peft_model(kind: str, arch: str) -> peft.PeftModel:
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base(arch)), peft_config(kind, arch))
    perturbed(p for p in model.parameters() if p.requires_grad)
    return model.eval()


def our_model(kind: str, arch: str) -> deltatune.DeltaModel:
    torch.manual_seed(1)
    model = deltatune.attach(base(arch), our_config(kind, arch))
    perturbed(model.adapter_parameters("default"))
    return model.eval()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_changed(actual: torch.Tensor, arch: str) -> None:
    assert (actual - run(base(arch))).abs().max() > 1e-3


# ----------------------------------------------------------------------------- against peft
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_peft_folder_loads_with_peft_outputs(kind: str, arch: str, tmp_path: Path) -> None:
    theirs = peft_model(kind, arch)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(base(arch), str(tmp_path))
    expected = run(theirs)
    assert_changed(expected, arch)
    assert_same(run(ours), expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_our_folder_loads_in_peft_with_our_outputs_and_holds_peft_keys(kind: str, arch: str, tmp_path: Path) -> None:
    ours = our_model(kind, arch)
    ours.save(str(tmp_path / "ours"), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base(arch)), str(tmp_path / "ours")).eval()
    expected = run(ours)
    assert_changed(expected, arch)
    assert_same(run(theirs), expected)
    peft_model(kind, arch).save_pretrained(str(tmp_path / "peft"))
    keys = {
        key: tensor.shape for key, tensor in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()
    }
    peft_keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == {key: tensor.shape for key, tensor in peft_keys.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_peft_merge_and_unload(kind: str, arch: str, tmp_path: Path) -> None:
    theirs = peft_model(kind, arch)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(base(arch), str(tmp_path))
    unmerged = run(ours)
    ours.merge()
    assert_same(run(ours), unmerged)
    merged = ours.unload(merge=True)
    assert_same(run(merged), unmerged)
    assert_same(run(theirs.merge_and_unload()), unmerged)


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
def test_a_mixed_batch_equals_peft_per_row(arch: str, tmp_path: Path) -> None:
    """LoRA with trainable tokens: peft runs each row with its adapter (its token wrapper routes rows)."""
    theirs = peft_model("lora", arch)
    theirs.add_adapter("other", peft_config("lora", arch))
    perturbed(p for n, p in theirs.named_parameters() if ".other" in n)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(base(arch), str(tmp_path))
    deltatune.load(ours, str(tmp_path / "other"), name="other")
    names = ["default", "other", None]
    theirs.eval()
    with torch.no_grad():
        expected = theirs(**token_inputs(1), adapter_names=[name or "__base__" for name in names]).logits
    assert_same(run(ours, adapter_names=names), expected)


# ----------------------------------------------------------------------------- against the plain computation
def with_rows_written(arch: str, rows: torch.Tensor) -> nn.Module:
    """The base model with the embedding rows of `TOKENS` overwritten (a tied head shares them)."""
    model = base(arch)
    with torch.no_grad():
        model.get_submodule(EMBEDDING[arch]).weight[TOKENS] = rows
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_the_base_with_those_rows_overwritten_a_tied_head_included(arch: str) -> None:
    ours = our_model("trainable_tokens", arch)
    rows = ours.base_model.get_submodule(EMBEDDING[arch]).deltatune.adapters["default"].rows.detach()
    reference = with_rows_written(arch, rows)
    assert_same(run(ours), run(reference))
    head = reference.get_output_embeddings()
    if arch != "bert":  # the tied head really changed: its logits of the chosen tokens are x Rᵀ
        assert head.weight is reference.get_submodule(EMBEDDING[arch]).weight


def test_an_untied_head_keeps_its_own_rows() -> None:
    model = build("llama")  # tie_word_embeddings=False
    ours = deltatune.attach(copy.deepcopy(model), deltatune.TrainableTokensConfig(token_indices=TOKENS))
    perturbed(ours.adapter_parameters("default"))
    assert [name for name, _ in ours.sites()] == ["model.embed_tokens"]
    with torch.no_grad():
        model.model.embed_tokens.weight[TOKENS] = ours.base_model.model.embed_tokens.deltatune.adapters["default"].rows
    assert_same(run(ours), run(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_untrained_adapter_gives_the_base_outputs(arch: str) -> None:
    ours = deltatune.attach(base(arch), deltatune.TrainableTokensConfig(token_indices=TOKENS))
    torch.testing.assert_close(run(ours), run(base(arch)), atol=1e-6, rtol=0)


def test_only_the_chosen_rows_train_and_are_saved(tmp_path: Path) -> None:
    ours = deltatune.attach(tied_llama(), deltatune.TrainableTokensConfig(token_indices=[5, 7]))
    trainable = [(name, tuple(p.shape)) for name, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [("base_model.model.embed_tokens.deltatune.adapters.default.rows", (2, 32))]
    run(ours).sum().backward()
    assert ours.base_model.model.embed_tokens.deltatune.adapters["default"].rows.grad.abs().sum() > 0
    ours.save(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # The tied head's copy too, as peft's TRAINABLE_TOKENS files hold it.
    assert {key: tuple(tensor.shape) for key, tensor in saved.items()} == {
        "model.embed_tokens.rows": (2, 32),
        "lm_head.rows": (2, 32),
    }


def test_new_tokens_reload_onto_freshly_resized_embeddings_with_the_same_outputs(tmp_path: Path) -> None:
    """Resizing draws random rows for new tokens; the adapter replaces them, so a reload that resizes again
    (other random rows) gives the same outputs (why peft stores the rows and not a difference)."""
    model = tied_llama()
    torch.manual_seed(5)
    model.resize_token_embeddings(VOCAB + 2)
    new = [VOCAB, VOCAB + 1]
    ours = deltatune.attach(model, deltatune.TrainableTokensConfig(token_indices=new))
    perturbed(ours.adapter_parameters("default"))
    inputs = {"input_ids": torch.tensor([[3, VOCAB, 4, VOCAB + 1, 5]])}
    expected = ours(**inputs).logits
    ours.save(str(tmp_path))
    again = tied_llama()
    torch.manual_seed(6)
    again.resize_token_embeddings(VOCAB + 2)
    assert not torch.equal(again.model.embed_tokens.weight[VOCAB:], model.model.embed_tokens.weight[VOCAB:])
    loaded = deltatune.load(again, str(tmp_path))
    assert torch.equal(loaded(**inputs).logits, expected)


def smollm2_or_its_shape() -> tuple[nn.Module, str]:
    """The packaged SmolLM2 where this machine has it converted; else a one-layer model of its vocabulary
    and width (the adapter's size depends only on those)."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.smollm2 import COMPLETE_MARK, FOLDER_NAME, cache_root

    folder = cache_root() / FOLDER_NAME
    if (folder / COMPLETE_MARK).is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), "SmolLM2"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), "SmolLM2's shape"


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_an_adapter_for_two_new_tokens_on_smollm2_is_under_a_megabyte(fmt: str, tmp_path: Path) -> None:
    model, _ = smollm2_or_its_shape()
    vocabulary = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocabulary + 2)
    ours = deltatune.attach(model, deltatune.TrainableTokensConfig(token_indices=[vocabulary, vocabulary + 1]))
    ours.save(str(tmp_path), format=fmt)
    size = sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file())
    assert size < 1_000_000, size


# ----------------------------------------------------------------------------- bad input
def test_an_index_past_the_vocabulary_is_refused_with_the_remedy() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=r"token index 96 is outside .*resize_token_embeddings"):
        deltatune.attach(build("llama"), deltatune.TrainableTokensConfig(token_indices=[3, VOCAB]))


@pytest.mark.parametrize(
    "config",
    [
        lambda: deltatune.TrainableTokensConfig(token_indices=[3, 3]),
        lambda: deltatune.TrainableTokensConfig(token_indices=[]),
        lambda: deltatune.LoraConfig(trainable_token_indices={"embed_tokens": [4, 4]}),
    ],
    ids=["repeated", "empty", "lora-repeated"],
)
def test_repeated_or_missing_indices_are_refused(config) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=r"more than once|is empty"):
        config()


def test_an_embedding_both_lora_target_and_token_rows_is_refused() -> None:
    config = deltatune.LoraConfig(target_modules=["embed_tokens", "q_proj"], trainable_token_indices=[3, 4])
    with pytest.raises(deltatune.TargetConflictError, match=r"'model.embed_tokens' has trainable tokens"):
        deltatune.attach(build("llama"), config)


def test_a_tied_head_with_other_indices_keeps_its_own_rows_and_refuses_to_merge() -> None:
    """peft's rule: different indices at a tied head untie the adapters; merging one then changes the other."""
    config = deltatune.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 4], "lm_head": [5, 6]}
    )
    ours = deltatune.attach(tied_llama(), config)
    with pytest.raises(deltatune.MergeError, match="tied to"):
        ours.merge()


def test_saving_modules_to_save_in_peft_trainable_tokens_format_is_refused(tmp_path: Path) -> None:
    config = deltatune.TrainableTokensConfig(token_indices=[3], modules_to_save=["lm_head"])
    ours = deltatune.attach(build("llama"), config)
    with pytest.raises(deltatune.DeltaTuneError, match="no modules_to_save"):
        ours.save(str(tmp_path), format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "adapter",
    [
        {"method": "trainable_tokens", "token_indices": WORD_IDS},
        {
            "method": "lora",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "trainable_token_indices": WORD_IDS,
        },
    ],
    ids=["trainable_tokens", "lora-trainable_token_indices"],
)
def test_training_from_yaml_loss_falls_and_saves_only_the_rows(adapter: dict, tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", method=adapter, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = load_file(str(tmp_path / "out" / ADAPTER_FOLDER / "adapter_model.safetensors"))
    rows = [tensor for key, tensor in saved.items() if key.endswith("embed_tokens.rows")]
    assert [tuple(tensor.shape) for tensor in rows] == [(len(WORD_IDS), 32)]


def test_resume_of_a_run_with_token_rows_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    adapter = {**RESUME_SETTINGS["adapter"], "trainable_token_indices": WORD_IDS}
    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, "adapter": adapter})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


def test_resume_with_other_token_indices_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    method = {"method": "trainable_tokens", "token_indices": WORD_IDS}
    config = task_config(tmp_path, "causal-lm", method=method, max_steps=2, save_every=1, eval_file=None)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "adapter.token_indices=[9,11]", "adapter.token_indices"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_embedding_rows_bit_exactly_and_merge_keeps_only_those_rows(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    """Trained rows replace the weight's rows, so unmerge puts the overwritten rows back (peft restores
    its saved copy) instead of subtracting R − E[i] again, which rounds in bf16; and what merge keeps
    for that is k × d, not a vocabulary-sized delta."""
    peft_model("trainable_tokens", "llama-tied").save_pretrained(str(tmp_path))
    model = base("llama-tied").to(dtype)
    original = model.get_submodule(EMBEDDING["llama-tied"]).weight.detach().clone()
    ours = deltatune.load(model, str(tmp_path))
    ours.merge()
    merged = model.get_submodule(EMBEDDING["llama-tied"]).weight.detach()
    assert not torch.equal(merged, original)
    kept = [
        tensor
        for _, site in ours.sites()
        for deltas in site.merges.values()
        if deltas
        for delta in deltas.values()
        for tensor in (delta if isinstance(delta, tuple) else [delta])
    ]
    assert kept and max(tensor.numel() for tensor in kept) <= len(TOKENS) * original.shape[1]
    ours.unmerge()
    assert torch.equal(model.get_submodule(EMBEDDING["llama-tied"]).weight, original)
