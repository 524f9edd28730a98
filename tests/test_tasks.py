"""Task types: losses computed at labelled positions only equal the models' own losses; heads that
must train are found; unknown task names are clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.losses import causal_lm_loss, contrastive_loss, seq2seq_lm_loss
from deltatune.train.tasks import TASKS, get_task, trained_heads
from tiny_models import VOCAB, build
from training_fixtures import MODELS


def lm_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows whose first tokens are a prompt (label -100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return input_ids, attention_mask, labels


def randomized(delta_model: deltatune.DeltaModel) -> deltatune.DeltaModel:
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.normal_(0, 0.2)
    return delta_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "lora"])
def test_causal_lm_loss_equals_the_models_own_loss(arch: str, wrapped: bool) -> None:
    model = build(arch)
    if wrapped:
        model = randomized(deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules="all-linear")))
    input_ids, attention_mask, labels = lm_batch()
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(causal_lm_loss(model, input_ids, attention_mask, labels), expected, atol=1e-5, rtol=0)


def test_causal_lm_loss_applies_the_head_to_labelled_positions_only() -> None:
    model = build("llama")
    input_ids, attention_mask, labels = lm_batch()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[:-1].numel()))
    causal_lm_loss(model, input_ids, attention_mask, labels, chunk_rows=None)
    assert seen == [int((labels[:, 1:] != -100).sum())]


def test_causal_lm_loss_gives_gradients_to_the_adapter_only() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    causal_lm_loss(delta_model, *lm_batch()).backward()
    grads = {name: p.grad for name, p in delta_model.named_parameters() if p.grad is not None}
    assert grads and all(".deltatune." in name for name in grads)


def test_causal_lm_loss_with_a_trained_copy_of_the_head() -> None:
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    randomized(delta_model)
    input_ids, attention_mask, labels = lm_batch()
    expected = delta_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(causal_lm_loss(delta_model, input_ids, attention_mask, labels), expected, atol=1e-5, rtol=0)


def test_causal_lm_loss_under_prompt_tuning_equals_the_models_own_loss() -> None:
    if "prompt_tuning" not in deltatune.registered_methods():
        pytest.skip("prompt tuning is not registered in this checkout")
    config = deltatune.get_method("prompt_tuning").config_class(num_virtual_tokens=3)
    delta_model = randomized(deltatune.attach(build("llama"), config))
    input_ids, attention_mask, labels = lm_batch()
    expected = delta_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(causal_lm_loss(delta_model, input_ids, attention_mask, labels), expected, atol=1e-5, rtol=0)


def test_causal_lm_loss_without_labels_is_an_error() -> None:
    input_ids, attention_mask, _ = lm_batch()
    with pytest.raises(deltatune.DeltaTuneError, match="no labelled position"):
        causal_lm_loss(build("llama"), input_ids, attention_mask, torch.full_like(input_ids, -100))


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "lora"])
def test_seq2seq_lm_loss_equals_the_models_own_loss(wrapped: bool) -> None:
    model = build("t5")
    if wrapped:
        model = randomized(deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules="all-linear")))
    input_ids, attention_mask, labels = lm_batch()
    labels = labels[:, 3:7].contiguous()
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    assert torch.allclose(seq2seq_lm_loss(model, batch), expected, atol=1e-5, rtol=0)


def test_contrastive_loss_matches_its_definition() -> None:
    model = MODELS["feature-extraction"][1].from_config(MODELS["feature-extraction"][0]()).eval()
    ids = torch.randint(10, 90, (4, 5), generator=torch.Generator().manual_seed(0))
    positives = torch.randint(10, 90, (4, 6), generator=torch.Generator().manual_seed(1))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "positive_input_ids": positives,
        "positive_attention_mask": torch.ones_like(positives),
    }
    anchors = F.normalize(model(input_ids=ids).last_hidden_state.mean(1), dim=-1)
    targets = F.normalize(model(input_ids=positives).last_hidden_state.mean(1), dim=-1)
    expected = F.cross_entropy(20.0 * anchors @ targets.t(), torch.arange(4))
    assert torch.allclose(contrastive_loss(model, batch), expected, atol=1e-5)


@pytest.mark.parametrize("task,head", [("seq-cls", ["score"]), ("token-cls", ["classifier"]), ("qa", ["qa_outputs"])])
def test_trained_heads_are_the_new_task_heads(task: str, head: list[str]) -> None:
    make_config, auto_class, _ = MODELS[task]
    assert TASKS[task].trains_head
    assert trained_heads(auto_class.from_config(make_config())) == head


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="Did you mean 'seq-cls'.*Known tasks: causal-lm"):
        get_task("seq-clss")
