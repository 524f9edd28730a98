"""`deltatune train CONFIG.yaml`: every task type trains a tiny model and its loss falls; any
registered method is used by name; the output folder holds the adapter, metrics.json and the plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune
from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.tasks import get_task
from training_fixtures import MODELS, records, task_config


def read_metrics(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


def losses(metrics: dict) -> list[float]:
    return [entry["loss"] for entry in metrics["history"] if "loss" in entry]


@pytest.mark.parametrize("task", list(MODELS))
def test_each_task_trains_through_the_command_and_its_loss_falls(task: str, tmp_path) -> None:
    config = task_config(tmp_path, task)
    assert main(["train", str(config), "--quiet"]) == 0
    metrics = read_metrics(tmp_path)
    trained = losses(metrics)
    assert len(trained) == 6 and trained[-1] < trained[0]
    assert metrics["task"] == task and 0.0 <= metrics["eval"][get_task(task).main_metric] <= 1.0
    for produced in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "out" / produced).is_file()


def test_the_output_folder_holds_a_png_plot_of_loss_and_metric(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["train", str(task_config(tmp_path, "seq-cls", eval_every=3)), "--quiet"]) == 0
    assert (tmp_path / "out" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_configs_are_valid(example: Path) -> None:
    config = TrainConfig.from_yaml(example)
    assert config.adapter_config().method == config.adapter["method"]


def test_in_memory_records_train_like_a_file(tmp_path) -> None:
    """From Python, train_file / eval_file may be any iterable of dicts, such as a `datasets.Dataset`."""
    rows = records("seq-cls")
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls"))
    config.train_file, config.eval_file = rows, rows
    result = train(config, progress=False)
    assert (
        result.final.metrics["accuracy"] >= 0.0
        and losses(read_metrics(tmp_path))[-1] < losses(read_metrics(tmp_path))[0]
    )


def test_overrides_reach_the_adapter_config(tmp_path) -> None:
    config = TrainConfig.from_yaml(
        task_config(tmp_path, "causal-lm"),
        ["adapter.r=2", "adapter.target_modules=[q_proj,v_proj]", "learning_rate=1e-3"],
    )
    built = config.adapter_config()
    assert (built.r, built.target_modules, config.learning_rate) == (2, ["q_proj", "v_proj"], 1e-3)


@pytest.mark.parametrize(
    "adapter",
    [
        {"method": "bitfit", "add_missing_bias": True},
        {"method": "lora", "r": 2, "use_rslora": True, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
    ],
    ids=["bitfit", "rslora"],
)
def test_a_method_is_picked_by_name_with_its_fields(adapter: dict, tmp_path) -> None:
    result = train(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=adapter)), progress=False)
    assert result.run.delta_model.configs["default"].method == adapter["method"]
    assert losses(read_metrics(tmp_path))[-1] < losses(read_metrics(tmp_path))[0]


@pytest.mark.parametrize("listed", [None, ["LayerNorm"], []], ids=["unset", "user-list", "empty-list"])
def test_a_new_classification_head_trains_whatever_modules_to_save_the_user_lists(listed, tmp_path) -> None:
    """The task's freshly initialised head is added to the user's `modules_to_save` (as peft does)."""
    method = {"method": "lora", "r": 2, "target_modules": ["query"], "modules_to_save": listed}
    result = train(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", method=method, arch="bert")), progress=False)
    delta_model = result.run.delta_model
    assert delta_model.configs["default"].modules_to_save == (listed or []) + ["classifier"]
    assert any(parameter.requires_grad for name, parameter in delta_model.named_parameters() if "classifier" in name)


@dataclasses.dataclass
class ScaleConfig(deltatune.TargetedConfig):
    """A user's method: a learned per-feature scale on each selected Linear's output."""


class Scale(deltatune.SiteAdapter):
    def __init__(self, module: nn.Linear, module_name: str, config: ScaleConfig) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(module.out_features))

    def forward(self, module, args, kwargs, output):
        return output * (1 + self.scale)


def test_a_user_registered_method_trains_by_name(tmp_path) -> None:
    if "train_test_scale" not in deltatune.registered_methods():
        deltatune.register("train_test_scale")(
            type(
                "ScaleMethod",
                (deltatune.ModuleMethod,),
                {"config_class": ScaleConfig, "adapter_types": {nn.Linear: Scale}},
            )
        )
    adapter = {"method": "train_test_scale", "target_modules": ["down_proj"]}
    assert main(["train", str(task_config(tmp_path, "causal-lm", method=adapter)), "--quiet"]) == 0
    assert losses(read_metrics(tmp_path))[-1] < losses(read_metrics(tmp_path))[0]


def test_accumulation_matches_one_big_batch(tmp_path) -> None:
    """Two micro-batches of 8 give the update of one batch of 16 (mean losses, same examples)."""
    whole = train(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", max_steps=2, eval_file=None)), progress=False)
    split_config = task_config(
        tmp_path,
        "seq-cls",
        max_steps=2,
        eval_file=None,
        batch_size=8,
        gradient_accumulation_steps=2,
        output_dir=str(tmp_path / "split"),
    )
    split = train(TrainConfig.from_yaml(split_config), progress=False)
    for (name, a), (_, b) in zip(whole.run.delta_model.named_parameters(), split.run.delta_model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_gradient_checkpointing_and_bf16_still_train(tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", gradient_checkpointing=True, bf16=True, eval_file=None)
    train(TrainConfig.from_yaml(config), progress=False)
    assert losses(read_metrics(tmp_path))[-1] < losses(read_metrics(tmp_path))[0]


def test_eval_command_reports_the_task_metrics(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "seq-cls")
    assert main(["train", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(config)]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert set(reported) == {"loss", "accuracy", "f1"}
    assert reported["accuracy"] == pytest.approx(read_metrics(tmp_path)["eval"]["accuracy"])


def test_inspect_marks_and_counts_parameters_and_folds_blocks(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm")
    assert main(["inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "0-1 (LlamaDecoderLayer)" in out and "×2, each" in out
    assert "adapter" in out and "frozen" in out and out.strip().splitlines()[-1].startswith("total:")


def test_inspect_counts_tied_weights_once() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.train.tree import describe_tree

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    lines = describe_tree(model).splitlines()
    unique = sum(p.numel() for p in model.parameters())
    assert lines[-1] == f"total: trainable {unique:,}  (100.0000% train)"
    assert any(
        line.strip().startswith("lm_head (Linear)") and "tied to weights counted above: 3,072" in line for line in lines
    )
