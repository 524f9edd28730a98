"""Soft prompts (prompt tuning, P-tuning, prefix tuning): generate() with padding, mixed batches,
gradient checkpointing, text initialisation, early errors, reloading to train on, collapsing encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.methods.prompt_tuning import text_token_ids
from prompt_helpers import PROMPTS, generate_new_tokens, left_padded, lively, tiny_tokenizer_folder
from tiny_models import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIGS = {
    "prompt_tuning": lambda count: deltatune.PromptTuningConfig(num_virtual_tokens=count),
    "p_tuning": lambda count: deltatune.PTuningConfig(
        num_virtual_tokens=count, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
    "prefix_tuning": lambda count: deltatune.PrefixTuningConfig(
        num_virtual_tokens=count, prefix_projection=True, encoder_hidden_size=8
    ),
}
GENERATORS = ["llama", "gpt2", "t5"]


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Training-mode outputs without randomness, so runs with and without checkpointing compare."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model


def randomize(delta_model: deltatune.DeltaModel, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters(name):
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def with_two_adapters(method: str, arch: str) -> deltatune.DeltaModel:
    """Adapters "a" (3 virtual tokens) and "b" (5), random weights."""
    delta_model = deltatune.attach(lively(arch), CONFIGS[method](3), name="a").eval()
    delta_model.add("b", CONFIGS[method](5))
    randomize(delta_model, "a", seed=1)
    randomize(delta_model, "b", seed=2)
    return delta_model


def padded(arch: str) -> dict[str, torch.Tensor]:
    return left_padded(side="right" if arch == "t5" else "left")


def alone(prompt: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([prompt])}


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("arch", GENERATORS)
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_padded_batch_generates_what_each_prompt_generates_alone(method: str, arch: str, search: str) -> None:
    delta_model = deltatune.attach(lively(arch), CONFIGS[method](4)).eval()
    randomize(delta_model, "default", seed=1)
    options = {"num_beams": 2} if search == "beam" else {}
    batch = generate_new_tokens(delta_model, padded(arch), 5, arch == "t5", **options)
    assert batch == [
        generate_new_tokens(delta_model, alone(prompt), 5, arch == "t5", **options)[0] for prompt in PROMPTS
    ]
    with delta_model.disabled():
        assert batch != generate_new_tokens(delta_model, padded(arch), 5, arch == "t5", **options)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("arch", GENERATORS)
def test_mixed_batch_of_two_prompts_and_a_base_row_equals_separate_runs(method: str, arch: str) -> None:
    delta_model = with_two_adapters(method, arch)
    inputs = padded(arch)
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6]] * 3)} if arch == "t5" else {}
    names = ["a", "b", None]
    with torch.no_grad():
        mixed = delta_model(**inputs, **extra, adapter_names=names).logits
        separate = []
        for row, name in enumerate(names):
            delta_model.activate(name or "a")
            with delta_model.disabled() if name is None else torch.no_grad():
                separate.append(delta_model(**inputs, **extra).logits[row])
    for row in range(3):
        torch.testing.assert_close(mixed[row], separate[row], atol=1e-4, rtol=0)  # weights ×3 amplify float noise
    generated = generate_new_tokens(delta_model, inputs, 5, arch == "t5", adapter_names=names)
    for row, name in enumerate(names):
        delta_model.activate(name or "a")
        with delta_model.disabled() if name is None else torch.no_grad():
            assert generated[row] == generate_new_tokens(delta_model, inputs, 5, arch == "t5")[row]
    assert len({tuple(tokens) for tokens in generated}) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_prefix_tuning_trains_with_gradient_checkpointing(arch: str) -> None:
    delta_model = deltatune.attach(without_dropout(build(arch)), CONFIGS["prefix_tuning"](4))
    inputs = {**left_padded(side="right" if arch == "t5" else "left")}
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    delta_model.train()
    plain_loss = delta_model(**inputs).loss
    delta_model.gradient_checkpointing_enable()
    assert delta_model.base_model.is_gradient_checkpointing
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = delta_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(plain_loss.item(), abs=1e-5)  # the prefix is not dropped by checkpointing
    assert losses[-1] < losses[0] - 0.05
    with delta_model.disabled():
        assert delta_model(**inputs).loss.item() != pytest.approx(losses[-1], abs=1e-3)


def test_text_init_equals_the_text_embeddings(tmp_path: Path) -> None:
    folder = tiny_tokenizer_folder(tmp_path / "tokenizer")
    text = "classify the sentiment of this review"
    config = deltatune.PromptTuningConfig(
        num_virtual_tokens=8,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(folder),
    )
    model = build("llama")
    delta_model = deltatune.attach(model, config)
    from transformers import AutoTokenizer

    token_ids = AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    assert text_token_ids(config) == (token_ids * 2)[:8]  # 6 words, repeated to 8
    table = next(delta_model.adapter_parameters("default"))
    torch.testing.assert_close(
        table, model.get_input_embeddings().weight[torch.tensor((token_ids * 2)[:8])], atol=0, rtol=0
    )


def test_text_init_without_a_tokenizer_is_refused_at_config_time() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="tokenizer"):
        deltatune.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the review")
    with pytest.raises(deltatune.DeltaTuneError, match="prompt_tuning_init_text"):
        deltatune.PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="somewhere")


@pytest.mark.parametrize("method", CONFIGS)
def test_a_prompt_longer_than_the_model_allows_is_refused_before_any_computation(method: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="at most 64 positions"):
        deltatune.attach(build("gpt2"), CONFIGS[method](64))
    delta_model = deltatune.attach(build("gpt2"), CONFIGS[method](10))
    calls = []
    delta_model.base_model.transformer.h[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(deltatune.DeltaTuneError, match="needs 65 positions"):
        delta_model(input_ids=torch.randint(3, 90, (1, 55)))
    assert calls == []
    delta_model(input_ids=torch.randint(3, 90, (1, 54)))
    assert calls == [1]


@pytest.mark.parametrize("method", CONFIGS)
def test_saved_adapter_reloads_trainable_and_trains_on(method: str, tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("llama"), CONFIGS[method](4))
    randomize(delta_model, "default", seed=1)
    delta_model.save(tmp_path / "ours")
    delta_model.save(tmp_path / "peft", format="peft")
    inputs = {"input_ids": torch.tensor(PROMPTS[2:])}
    for folder in ("ours", "peft"):
        reloaded = deltatune.load(build("llama"), tmp_path / folder, trainable=True)
        trainable = [p for p in reloaded.parameters() if p.requires_grad]
        assert trainable and {id(p) for p in trainable} == {id(p) for p in reloaded.adapter_parameters("default")}
        expected = delta_model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        losses = []
        for _ in range(5):
            loss = reloaded(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
    assert (
        sum(p.numel() for p in deltatune.load(build("llama"), tmp_path / "ours").adapter_parameters("default"))
        == delta_model.trainable_summary().per_adapter["default"]
    )


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning"])
def test_collapsing_the_encoder_keeps_the_outputs(method: str, tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("t5"), CONFIGS[method](4))
    randomize(delta_model, "default", seed=1)
    inputs = {"input_ids": torch.tensor(PROMPTS[2:]), "decoder_input_ids": torch.tensor([[0, 5]])}
    expected = delta_model(**inputs).logits
    before = delta_model.trainable_summary().per_adapter["default"]
    deltatune.collapse_soft_prompt(delta_model)
    torch.testing.assert_close(delta_model(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert delta_model.trainable_summary().per_adapter["default"] < before
    assert delta_model.configs["default"].method in ("prompt_tuning", "prefix_tuning")
    assert not getattr(delta_model.configs["default"], "prefix_projection", False)
    delta_model.save(tmp_path)
    torch.testing.assert_close(deltatune.load(build("t5"), tmp_path)(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_outputs_line_up_with_the_real_tokens(method: str, arch: str) -> None:
    model = build(arch)
    delta_model = deltatune.attach(copy.deepcopy(model), CONFIGS[method](4))
    inputs = padded(arch)
    output = delta_model(**inputs, output_hidden_states=True)
    base = model(**inputs, output_hidden_states=True)
    assert output.logits.shape == base.logits.shape
    assert [h.shape for h in output.hidden_states] == [h.shape for h in base.hidden_states]
    if arch != "bert":
        assert delta_model(**inputs, labels=inputs["input_ids"]).loss.isfinite()


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_sampling_generate_runs_and_repeats_under_a_seed(method: str, arch: str) -> None:
    delta_model = deltatune.attach(lively(arch), CONFIGS[method](4)).eval()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate_new_tokens(delta_model, padded(arch), 5, arch == "t5", do_sample=True, top_k=20))
    assert runs[0] == runs[1] and len(runs[0]) == 3
