"""LoRA+ in the trainer (`loraplus_lr_ratio`): the optimizer's parameter groups are peft's
`create_loraplus_optimizer` groups, one training step equals a plain torch step with peft's optimizer
on the same weights and batch, a YAML run trains, and resume keeps every group's state. The frozen A
of LoRA-FA (`freeze_lora_a`): the parameters peft's `create_lorafa_optimizer` freezes, A unchanged by
training while B trains and the loss falls."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.encode import collate
from deltatune.train.loop import prepare_run, train_run
from deltatune.train.optimizer import build_optimizer, freeze_lora_a
from resume_checks import (
    RESUME_SETTINGS,
    assert_resume_equals_the_uninterrupted_run,
    assert_resume_with_a_switched_setting_is_refused,
)
from tiny_models import build
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RATE, RATIO, EMBEDDING_RATE, DECAY = 1e-3, 16.0, 1e-5, 0.1


def loraplus_config(**settings) -> TrainConfig:
    """A config whose optimizer settings are LoRA+ (model and data are not read by the optimizer)."""
    loraplus = {"loraplus_lr_ratio": RATIO, "loraplus_lr_embedding": EMBEDDING_RATE}
    return TrainConfig(
        model="unused", train_file="unused.jsonl", learning_rate=RATE, weight_decay=DECAY, **{**loraplus, **settings}
    )


def peft_loraplus(model: torch.nn.Module) -> torch.optim.AdamW:
    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=RATE,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=EMBEDDING_RATE,
        loraplus_weight_decay=DECAY,
    )


def canonical(name: str) -> str:
    """A trainable parameter's name with the library's wrapping removed, the same for peft and us."""
    for wrapping, plain in (
        ("base_model.model.", ""),
        ("base_model.", ""),
        (".deltatune.adapters.default.copy.", "."),
        (".deltatune.adapters.default.", "."),
        (".modules_to_save.default.", "."),
        ("lora_embedding_A.default", "lora_A"),
        ("lora_embedding_B.default", "lora_B"),
        ("lora_A.default.weight", "lora_A"),
        ("lora_B.default.weight", "lora_B"),
    ):
        name = name.replace(wrapping, plain)
    return name


def groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[set[str], float, float]]:
    names = {id(parameter): canonical(name) for name, parameter in model.named_parameters()}
    return [
        ({names[id(parameter)] for parameter in group["params"]}, group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
    ]


def peft_and_ours(tmp_path: Path) -> tuple[peft.PeftModel, deltatune.DeltaModel]:
    """The same adapter on a tiny BERT in peft and in deltatune: an embedding LoRA, linear LoRAs, a
    saved head (weight and bias) and a saved LayerNorm."""
    base = build("bert")
    lora = peft.LoraConfig(
        r=4,
        target_modules=["word_embeddings", "query", "value"],
        modules_to_save=["classifier", "embeddings.LayerNorm"],
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), lora)
    theirs.save_pretrained(tmp_path)
    return theirs, deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {canonical(name) for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_loraplus_groups_equal_peft_create_loraplus_optimizer(tmp_path: Path) -> None:
    """Every group holds the same parameters with the same rate and weight decay as peft's."""
    theirs, ours = peft_and_ours(tmp_path)

    expected = groups_by_name(theirs, peft_loraplus(theirs))
    actual = groups_by_name(ours, build_optimizer(ours, loraplus_config()))
    assert actual == expected
    assert all(members for members, _, _ in expected)  # every group is exercised


def test_without_a_ratio_every_parameter_is_one_group_at_the_learning_rate() -> None:
    ours = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    optimizer = build_optimizer(ours, loraplus_config(loraplus_lr_ratio=None))
    trainable = [parameter for parameter in ours.parameters() if parameter.requires_grad]
    assert len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups
    assert group["params"] == trainable and group["lr"] == RATE and group["weight_decay"] == DECAY


def test_one_loraplus_training_step_equals_a_torch_step_with_peft_optimizer(tmp_path: Path) -> None:
    """deltatune's trainer, one full-batch step, against peft's optimizer in a plain torch loop from the
    same initial weights (random A and B, an embedding LoRA) on the same batch: the same weights after."""
    overrides = ["max_steps=1", "max_grad_norm=null", "eval_file=null", "bf16=false", "device=cpu"]
    adapter = ["adapter.init_lora_weights=false", "adapter.target_modules=[embed_tokens,q_proj,v_proj,down_proj]"]
    config = TrainConfig.from_yaml(
        task_config(tmp_path, "causal-lm", learning_rate=RATE, weight_decay=DECAY), overrides + adapter
    )
    config = dataclasses.replace(config, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=EMBEDDING_RATE)
    run = prepare_run(config, torch.device("cpu"))
    run.delta_model.save(str(tmp_path / "initial"), format="peft")
    batch = collate(run.train_features, pad_id=run.eval_context.pad_id)

    base = AutoModelForCausalLM.from_pretrained(config.model)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "initial"), is_trainable=True).train()
    optimizer = peft_loraplus(theirs)
    theirs(**batch).loss.backward()
    optimizer.step()
    theirs.save_pretrained(tmp_path / "peft-after")

    train_run(run, progress=False)
    run.delta_model.save(str(tmp_path / "ours-after"), format="peft")
    expected, actual = (_adapter(tmp_path / folder) for folder in ("peft-after", "ours-after"))
    initial = _adapter(tmp_path / "initial")
    assert expected.keys() == actual.keys() == initial.keys()
    for key in expected:
        assert not torch.equal(expected[key], initial[key]), key  # every factor moved
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_training_from_yaml_with_loraplus_ratio_16_loss_falls(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", loraplus_lr_ratio=16, learning_rate=0.002, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert len(trained) == 6 and trained[-1] < trained[0]


def test_checkpoint_keeps_every_group_and_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS, loraplus_lr_ratio=8)
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    groups = state["param_groups"]
    assert [group["initial_lr"] for group in groups] == [0.02, 1e-6, 0.02 * 8, 0.02 * 8]
    saved = {
        key.split(".")[1]
        for key in load_file(str(tmp_path / "cut" / "checkpoints" / "step-000003" / "optimizer.safetensors"))
    }
    assert saved == {str(index) for group in groups for index in group["params"]}  # moments of every parameter


def test_resume_with_another_loraplus_ratio_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = task_config(tmp_path, "causal-lm", max_steps=2, save_every=1, eval_file=None, loraplus_lr_ratio=16)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "loraplus_lr_ratio=4", "loraplus_lr_ratio: 16 → 4"
    )


def test_freeze_lora_a_freezes_what_peft_create_lorafa_optimizer_freezes(tmp_path: Path) -> None:
    theirs, ours = peft_and_ours(tmp_path)
    before = trainable_names(ours)
    create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=RATE)
    freeze_lora_a(ours, loraplus_config(loraplus_lr_ratio=None, freeze_lora_a=True))
    assert trainable_names(ours) == trainable_names(theirs)
    assert before - trainable_names(ours) == {name for name in before if name.endswith("query.lora_A")} | {
        name for name in before if name.endswith("value.lora_A")
    }


def test_training_with_frozen_a_keeps_every_a_and_trains_every_b_and_the_loss_falls(tmp_path: Path) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", freeze_lora_a=True, eval_file=None))
    run = prepare_run(config, torch.device("cpu"))
    initial = {name: parameter.detach().clone() for name, parameter in run.delta_model.named_parameters()}
    factors = {name for name in initial if name.endswith(("lora_A", "lora_B"))}
    result = train_run(run, progress=False)
    trained = dict(run.delta_model.named_parameters())
    assert factors and all(torch.equal(trained[name], initial[name]) == name.endswith("lora_A") for name in factors), (
        "every A kept, every B changed"
    )
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_resume_with_frozen_a_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """The checkpoints hold B only; the resumed run rebuilds A from the seed, as the first run did."""
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS, freeze_lora_a=True)
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


def test_resume_with_freeze_lora_a_switched_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = task_config(tmp_path, "causal-lm", max_steps=2, save_every=1, eval_file=None, freeze_lora_a=True)
    assert_resume_with_a_switched_setting_is_refused(
        config, tmp_path, capsys, "freeze_lora_a=false", "freeze_lora_a: true → false"
    )


@pytest.mark.parametrize("setting", [{"loraplus_lr_ratio": 16}, {"freeze_lora_a": True}])
@pytest.mark.parametrize("method", [{"method": "bitfit"}, {"method": "prompt_tuning", "num_virtual_tokens": 2}])
def test_a_lora_setting_with_a_method_without_lora_factors_is_a_one_line_error(
    setting: dict, method: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = task_config(tmp_path, "causal-lm", method=method, **setting)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    (name,) = setting
    assert len(error) == 1 and method["method"] in error[0] and f"remove {name}" in error[0], error
    assert not (tmp_path / "out").exists()


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))
