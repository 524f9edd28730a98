"""Packing (`packing: true`, deltatune.train.packing): a micro-batch packed into rows gives the loss and
adapter gradients of the same examples padded, as transformers computes them; packed runs train end to
end, resume bit-exactly and are a run identity of their own; what cannot pack is refused clearly."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import transformers

import deltatune
from deltatune.losses import IGNORE_INDEX, causal_lm_batch_loss
from deltatune.train import packing
from deltatune.train.cli import main
from deltatune.train.config import ConfigError, TrainConfig
from deltatune.train.encode import collate
from deltatune.train.packing import PackingError, check_model_packs, collate_packed, rows_of
from resume_checks import RESUME_SETTINGS as SHARED_RESUME_SETTINGS
from resume_checks import (
    adapter_tensors,
    assert_resume_equals_the_uninterrupted_run,
    assert_resume_with_a_switched_setting_is_refused,
)
from tiny_models import VOCAB, build
from training_fixtures import task_config

PAD = 0
RESUME_SETTINGS = {**SHARED_RESUME_SETTINGS, "packing": True}


def prompt_completion_features(count: int, seed: int) -> list[dict]:
    """Causal-LM examples of 3 to 14 tokens, the prompt (1 to 6 tokens) unlabelled; the last one has
    its first token labelled too, which alone predicts nothing and packed must not be learned."""
    rng = random.Random(seed)
    features = []
    for _ in range(count):
        prompt, completion = rng.randint(1, 6), rng.randint(2, 8)
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt + completion)]
        features.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}
        )
    features[-1]["labels"] = list(features[-1]["input_ids"])
    return features


def lora_gradients(delta_model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.grad.clone() for name, parameter in delta_model.named_parameters() if parameter.requires_grad
    }


@pytest.mark.parametrize("capacity", [16, None], ids=["rows-of-16", "one-row"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_loss_and_lora_gradients_equal_transformers_on_the_padded_batch(arch: str, capacity) -> None:
    torch.manual_seed(0)
    config = deltatune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    delta_model = deltatune.attach(build(arch), config).eval()  # no dropout: the two passes must see the same net
    features = prompt_completion_features(9, seed=1)

    padded = collate(features, PAD)
    expected = delta_model(**padded).loss  # transformers' own loss on the padded batch
    expected.backward()
    expected_gradients = lora_gradients(delta_model)
    delta_model.zero_grad()

    packed = collate_packed(features, PAD, capacity)
    assert len(packed["input_ids"]) < len(features) and "attention_mask" not in packed
    loss = causal_lm_batch_loss(delta_model, packed)
    loss.backward()

    assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-5
    gradients = lora_gradients(delta_model)
    assert gradients.keys() == expected_gradients.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        assert float(gradient.abs().max()) > 0, name
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=0, atol=1e-5, msg=name)


def test_packed_rows_stay_apart_where_the_loss_is_the_models_own(monkeypatch) -> None:
    """Without an output head to hook, the loss is the model's own `labels=` loss; a cache built by that
    forward would stop transformers from reading the packed rows from `position_ids`."""
    import deltatune.losses

    torch.manual_seed(0)
    model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, init_lora_weights=False)).eval()
    features = prompt_completion_features(9, seed=1)
    expected = float(model(**collate(features, PAD)).loss)
    monkeypatch.setattr(deltatune.losses, "output_head", lambda model: None)
    packed = float(causal_lm_batch_loss(model, collate_packed(features, PAD, 16)))
    assert abs(packed - expected) <= 1e-5


def test_rows_hold_every_example_once_as_few_and_as_even_as_their_capacity_allows() -> None:
    lengths = [7, 3, 12, 5, 5, 9, 1, 14, 4, 6]
    rows = rows_of(lengths, 24)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    filled = [sum(lengths[i] for i in row) for row in rows]
    assert len(rows) == math.ceil(sum(lengths) / 24) and max(filled) <= 24
    assert max(filled) - min(filled) <= max(lengths)
    assert rows_of([10, 10, 10], 15) == [[0], [1], [2]]  # two rows of 15 cannot hold 30 tokens in whole examples
    assert sorted(map(sorted, rows_of([20, 3], 16))) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_positions_restart_per_example_and_padding_is_a_block_of_its_own() -> None:
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
    ]
    packed = collate_packed(features, PAD, capacity=6)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 13, PAD], [5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, -100, 12, 13, -100], [-100, 6, 7, -100, 9]]


def tiny_bloom() -> torch.nn.Module:
    """A causal LM whose attention (ALiBi, masks from attention_mask only) ignores restarted positions."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config)


def test_a_model_that_mixes_packed_examples_is_refused_naming_its_type() -> None:
    torch.manual_seed(0)
    with pytest.raises(PackingError, match=r"^packing: bloom models .*; set packing: false$"):
        check_model_packs(
            deltatune.attach(tiny_bloom(), deltatune.LoraConfig(r=2, target_modules="all-linear")), torch.device("cpu")
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_and_gpt2_pass_the_packing_probe_and_keep_their_mode(arch: str) -> None:
    delta_model = deltatune.attach(build(arch), deltatune.LoraConfig(r=2, target_modules="all-linear"))
    delta_model.train()
    check_model_packs(delta_model, torch.device("cpu"))
    assert delta_model.training


def test_flash_attention_gets_each_micro_batch_in_one_row_and_other_attention_rows_of_max_length(monkeypatch) -> None:
    monkeypatch.setattr(packing, "check_model_packs", lambda model, device: None)
    model = build("llama")
    capacities = {}
    for implementation in ("flash_attention_2", "sdpa"):
        model.config._attn_implementation = implementation
        capacities[implementation] = packing.packed_collate_for(model, 32, PAD, torch.device("cpu")).keywords[
            "capacity"
        ]
    assert capacities == {"flash_attention_2": None, "sdpa": 32}


@pytest.mark.parametrize(
    ("task", "method", "reason"),
    [
        ("causal-lm", {"method": "prompt_tuning", "num_virtual_tokens": 4}, "virtual tokens"),
        ("causal-lm", {"method": "prefix_tuning", "num_virtual_tokens": 4}, "virtual tokens"),
        ("causal-lm", {"method": "p_tuning", "num_virtual_tokens": 4}, "virtual tokens"),
        ("seq2seq-lm", {"method": "lora"}, "T5's encoder"),
        ("seq-cls", {"method": "lora"}, "causal-lm only"),
    ],
)
def test_packing_is_refused_with_the_config_where_it_cannot_work(task: str, method: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as error:
        TrainConfig(model="m", task=task, train_file="t.jsonl", adapter=method, packing=True)
    assert str(error.value).endswith("set packing: false")


def test_a_packed_train_run_trains_the_adapter_the_padded_run_trains(tmp_path, monkeypatch) -> None:
    config = task_config(tmp_path, "causal-lm", batch_size=8, max_steps=4, eval_file=None, max_length=16)
    assert main(["train", str(config), f"output_dir={tmp_path / 'padded'}", "--quiet"]) == 0
    rows = []

    def counted(features, pad_id, capacity):
        batch = collate_packed(features, pad_id, capacity)
        rows.append((len(features), len(batch["input_ids"])))
        return batch

    monkeypatch.setattr(packing, "collate_packed", counted)
    assert main(["train", str(config), f"output_dir={tmp_path / 'packed'}", "packing=true", "--quiet"]) == 0
    assert len(rows) == 4 and all(packed < examples for examples, packed in rows), rows  # 8-token examples, 2 a row
    padded, packed = adapter_tensors(tmp_path / "padded"), adapter_tensors(tmp_path / "packed")
    assert padded.keys() == packed.keys()
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=0, atol=1e-5, msg=name)
    losses = [
        [entry["loss"] for entry in json.loads((tmp_path / run / "metrics.json").read_text())["history"]]
        for run in ("padded", "packed")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_resume_of_a_packed_run_equals_the_uninterrupted_packed_run(tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS)
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


def test_resume_with_packing_switched_is_refused_naming_it(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS)
    assert_resume_with_a_switched_setting_is_refused(config, tmp_path, capsys, "packing=false", "packing: true → false")


def test_a_checkpoint_that_predates_packing_resumes_with_packing_and_grouping_off(tmp_path, capsys) -> None:
    settings = {**RESUME_SETTINGS, "packing": False}
    config = task_config(tmp_path, "causal-lm", **settings)
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    state_file = tmp_path / "out" / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for name in ("packing", "group_by_length"):
        del state["run"]["fingerprint"][name]  # as a checkpoint written before these settings existed
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", "packing=true"]) == 2
    assert "packing: false → true" in capsys.readouterr().err
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
