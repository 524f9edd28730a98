"""`deltatune compare`: several methods, full fine-tuning included, on the same data, budget and seed
(a tiny BERT classifier, a few steps); the table, compare.json (each row checked against the method's
own metrics.json and, independently, against its saved adapter evaluated again and its files), the
plot, the time budget, and the one-line refusals of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import deltatune
import deltatune.train.loop as loop_module
from deltatune.errors import DeltaTuneError, TrainingDivergedError
from deltatune.train.cli import main
from deltatune.train.compare import CompareOptions, compare
from deltatune.train.compare_plan import Budget
from deltatune.train.config import TrainConfig
from deltatune.train.loop import prepare_run
from deltatune.train.progress import TrainingClock
from deltatune.train.time_budget import StopRule
from training_fixtures import records, task_config

pytestmark = pytest.mark.xdist_group("compare")
"""One worker runs the module (`--dist loadgroup`), so the comparison of the module fixture runs once."""

METHODS = ["lora", "bitfit", "houlsby", "full"]
"""The rows; `houlsby` is `houlsby=bottleneck` with its preset set."""
STEPS = 3
ROW_FIELDS = {
    "label",
    "method",
    "adapter",
    "overrides",
    "output_dir",
    "metric",
    "eval",
    "trainable_parameters",
    "total_parameters",
    "trainable_percent",
    "steps",
    "wall_seconds",
    "train_seconds",
    "peak_memory_bytes",
    "memory_kind",
    "adapter_bytes",
    "error",
    "status",
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, Path, str]:
    """One comparison run through the command line: (its config, its output folder, what it printed)."""
    root = tmp_path_factory.mktemp("compare")
    config = task_config(root, "seq-cls", arch="bert", output_dir=root / "out", eval_batch_size=8)
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["compare", str(config), "--methods", "lora,bitfit,houlsby=bottleneck,full", "--max-steps", str(STEPS)]
            + [
                "--set",
                "lora.adapter.r=2",
                "--set",
                "full.learning_rate=1e-3",
                "--set",
                "houlsby.adapter.preset=houlsby",
            ]
            + ["--quiet"]
        )
    assert code == 0
    return config, root / "out", printed.getvalue()


def rows(out: Path) -> list[dict]:
    return json.loads((out / "compare.json").read_text())["methods"]


def test_the_table_is_printed_and_written_with_a_row_per_method(compared) -> None:
    _, out, printed = compared
    written = (out / "compare.md").read_text()
    header = "| method | accuracy | trainable | trainable % | steps | wall s | peak MiB | adapter bytes |"
    for text in (printed, written):
        lines = [line for line in text.splitlines() if line.startswith("|")]
        assert lines[0] == header and len(lines) == 2 + len(METHODS)
        assert [line.split("|")[1].strip() for line in lines[2:]] == METHODS
    full = next(line for line in written.splitlines() if line.startswith("| full |")).split("|")
    assert full[4].strip() == "100" and full[5].strip() == str(STEPS)


def test_every_json_row_agrees_with_the_methods_own_metrics_and_files(compared) -> None:
    _, out, _ = compared
    summary = json.loads((out / "compare.json").read_text())
    assert summary["task"] == "seq-cls" and summary["metric"] == "accuracy" and summary["seed"] == 0
    assert summary["budget"] == f"{STEPS} optimizer steps each"
    assert [row["label"] for row in summary["methods"]] == METHODS
    assert [row["method"] for row in summary["methods"]] == ["lora", "bitfit", "bottleneck", "full"]
    for row in summary["methods"]:
        assert set(row) == ROW_FIELDS
        folder = out / row["label"]
        assert Path(row["output_dir"]) == folder
        metrics = json.loads((folder / "metrics.json").read_text())
        assert row["metric"] == metrics["eval"]["accuracy"] and row["eval"] == metrics["eval"]
        assert (row["steps"], row["wall_seconds"], row["train_seconds"]) == (
            metrics["steps"],
            metrics["seconds"],
            metrics["train_seconds"],
        )
        assert row["steps"] == STEPS and 0 < row["train_seconds"] <= row["wall_seconds"]
        assert (row["trainable_parameters"], row["total_parameters"]) == (
            metrics["trainable_parameters"],
            metrics["total_parameters"],
        )
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable_parameters"] / row["total_parameters"])
        adapter_files = [path for path in (folder / "adapter").iterdir() if path.is_file()]
        assert row["adapter_bytes"] == sum(path.stat().st_size for path in adapter_files) > 0
        # a tiny model may run in pages the process already holds, so its resident peak above the start can be 0
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0
        assert row["adapter"]["method"] == row["method"] and row["error"] is None
    by_method = {row["label"]: row for row in summary["methods"]}
    assert by_method["lora"]["adapter"]["r"] == 2 and by_method["lora"]["overrides"] == ["adapter.r=2"]
    assert by_method["houlsby"]["adapter"]["preset"] == "houlsby"
    assert by_method["full"]["trainable_percent"] == 100.0
    assert by_method["full"]["adapter_bytes"] > 4 * by_method["full"]["total_parameters"]  # every float32 weight


def test_each_row_metric_is_its_saved_adapter_evaluated_again(compared) -> None:
    """Independent of metrics.json: each method's kept adapter, loaded onto a fresh base and evaluated."""
    config, out, _ = compared
    for row in rows(out):
        run = prepare_run(TrainConfig.from_yaml(config), adapter=str(out / row["label"] / "adapter"))
        assert run.evaluate(progress=False).metrics["accuracy"] == row["metric"], row["label"]
        counted = sum(p.numel() for p in run.delta_model.adapter_parameters("default"))
        if row["method"] == "full":
            base = sum(p.numel() for p in run.delta_model.base_model.parameters())
            assert row["trainable_parameters"] == counted == base
        else:  # the adapter's parameters, and the classifier head's trained copy
            assert row["trainable_parameters"] == counted


def test_every_method_trained_on_the_same_examples_with_the_same_seed(compared) -> None:
    _, out, _ = compared
    steps = [
        [entry["step"] for entry in json.loads((out / m / "metrics.json").read_text())["history"]] for m in METHODS
    ]
    assert all(history == steps[0] for history in steps)
    assert all((out / method / "adapter" / "adapter_model.safetensors").is_file() for method in METHODS)


def test_the_plot_is_a_real_image(compared) -> None:
    from matplotlib import image

    _, out, _ = compared
    pixels = image.imread(out / "compare.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels[..., :3].std()) > 0.01  # not a blank canvas


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--methods", "lora,lorra"], "unknown method 'lorra'.* Known methods: .*bitfit.*full"),
        (["--methods", "lora,bitfit", "--max-steps", "0"], "--max-steps must be finite and positive, got 0"),
        (["--methods", "lora,bitfit", "--time-budget", "-5"], "--time-budget must be finite and positive, got -5"),
        (["--methods", "lora,bitfit", "--time-budget", "inf"], "--time-budget must be finite and positive, got inf"),
        (["--methods", "lora,bitfit", "--time-budget", "1e309"], "--time-budget must be finite and positive, got inf"),
        (["--methods", "lora,bitfit", "--epochs", "inf"], "--epochs must be finite and positive, got inf"),
        (["--methods", "lora,lora"], "names lora more than once"),
        (["--methods", "a.b=lora"], "label 'a.b' contains '.'"),
        (
            ["--methods", "lora", "--metric", "bleu", "output_dir=never-written"],
            "--metric 'bleu' is not computed for seq-cls; use one of loss, acc",
        ),
        (["--methods", "lora,bitfit", "--set", "lora.task=causal-lm"], "task is the same for every method"),
        (["--methods", "lora", "--set", "bitfit.learning_rate=1"], "for method 'bitfit', which --methods does not"),
        (["--methods", "lora,bitfit", "--set", "bitfit.adapter.method=lora"], "write LABEL=METHOD in --methods"),
        (["--methods", "lora,adalora", "--time-budget", "1"], "'adalora' .*step count.*--max-steps or --epochs"),
        (["--methods", "lora,bitfit"], "already holds a run .*compare.md.*--overwrite"),
    ],
    ids=[
        "unknown-method",
        "zero-steps",
        "negative-time",
        "infinite-time",
        "time-past-the-largest-float",
        "infinite-epochs",
        "repeated",
        "bad-label",
        "unknown-metric",
        "tasks-differ",
        "set-other",
        "set-method-under-another-label",
        "time-budget-for-a-step-schedule",
        "taken",
    ],
)
def test_bad_input_gets_one_line(compared, capsys, arguments: list[str], message: str) -> None:
    config, _, _ = compared
    capsys.readouterr()
    assert main(["compare", str(config), *arguments, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("deltatune: ")
    assert __import__("re").search(message, error), error


SCORING_SETS = [
    "max_train_examples=3",
    "max_eval_examples=2",
    "max_new_tokens=1",
    "chat_template=true",
    "system_prompt=Answer briefly.",
    "header=false",
    "column_names=[text, label]",
    "separator=|",
]
"""`--set` values that would train or score one row on other records, other prompts or other generated lengths than the
rest, so its metric would not compare with theirs."""


@pytest.mark.parametrize("override", SCORING_SETS)
def test_a_set_that_changes_what_a_row_is_trained_or_scored_on_is_refused(
    tmp_path: Path, capsys, override: str
) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", output_dir=tmp_path / "out")
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "lora,bitfit", "--set", f"lora.{override}", "--quiet"]) == 2
    error = capsys.readouterr().err
    key = override.partition("=")[0]
    assert error.count("\n") == 1 and f"{key} is the same for every method of a comparison" in error, error
    assert not (tmp_path / "out").exists()


def test_the_guide_names_every_key_a_comparison_holds_equal() -> None:
    from deltatune.train.compare_plan import SHARED_KEYS

    guide = (Path(__file__).parents[1] / "docs" / "training-data.md").read_text(encoding="utf-8")
    section = guide.partition("## Comparing methods")[2].partition("\n## ")[0]
    assert [key for key in SHARED_KEYS if f"`{key}`" not in section] == []


def test_a_method_that_cannot_run_the_task_is_refused_before_any_trains(tmp_path: Path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", packing=True)
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "lora,prompt_tuning", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "method 'prompt_tuning' cannot run in this comparison" in error and error.count("\n") == 1
    assert not (tmp_path / "out" / "lora").exists()


def test_a_diverging_method_is_a_row_with_its_error_and_the_next_method_runs(tmp_path: Path, capsys) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert")
    arguments = ["--max-steps", "2", "--set", "full.learning_rate=1e30", "--set", "full.max_grad_norm=null", "--quiet"]
    assert main(["compare", str(config), "--methods", "full,bitfit", *arguments]) == 0
    diverged, trained = rows(tmp_path / "out")
    assert diverged["error"].startswith("training diverged at step") and diverged["metric"] is None
    assert all(diverged[key] is None for key in ("trainable_parameters", "wall_seconds", "adapter_bytes"))
    assert trained["error"] is None and trained["steps"] == 2 and trained["metric"] is not None
    assert "| full | n/a |" in capsys.readouterr().out


def test_a_time_budget_stops_on_training_time_and_decays_over_it(tmp_path: Path) -> None:
    now = [0.0]
    rule = StopRule(steps=5, seconds=10.0, clock=TrainingClock(now=lambda: now[0]))
    now[0] = 4.0
    assert not rule.finished(step=99) and rule.share_spent(0) == pytest.approx(0.4) and rule.known_steps is None
    now[0] = 10.0
    assert rule.finished(step=1) and rule.share_spent(0) == 1.0
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", arch="bert", max_steps=1, scheduler="linear"))
    result = deltatune.train.train(config, progress=False, time_budget=0.5)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result.train_seconds >= 0.5 and metrics["steps"] == result.steps > 1  # past the config's max_steps
    rates = [entry["learning_rate"] for entry in metrics["history"] if "learning_rate" in entry]
    assert rates == sorted(rates, reverse=True) and rates[-1] < rates[0]
    assert torch.isfinite(torch.tensor(rates)).all()


def test_a_time_budget_is_refused_before_training_for_a_method_whose_schedule_counts_steps(tmp_path: Path) -> None:
    """AdaLoRA's rank budget runs over the config's step count, which a time budget does not fix."""
    adapter = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "target_modules": ["query"]}
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", method=adapter, arch="bert", max_steps=50))
    with pytest.raises(DeltaTuneError, match="adalora.*--max-steps or --epochs"):
        deltatune.train.train(config, progress=False, time_budget=0.5)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_checkpoint_of_a_time_budgeted_run_does_not_resume(tmp_path: Path, capsys) -> None:
    """Its learning rate followed the clock, so no resume can continue it exactly."""
    path = task_config(tmp_path, "seq-cls", arch="bert", max_steps=2, save_every=1, scheduler="linear")
    deltatune.train.train(TrainConfig.from_yaml(path), progress=False, time_budget=0.5)
    assert list((tmp_path / "out" / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", str(path), "--quiet", "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("deltatune: --resume:") and "time budget" in error, error


def test_a_comparison_in_which_every_method_diverged_fails_and_keeps_its_results(tmp_path: Path, capsys) -> None:
    """Nothing was compared, so a script running `deltatune compare ... && publish` must stop; the rows
    (with each error) are still written."""
    config = task_config(tmp_path, "seq-cls", arch="bert")
    rates = ["learning_rate=1e30", "head_learning_rate=1e30", "max_grad_norm=null"]
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "full,bitfit", "--max-steps", "2", *rates, "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert error.startswith("deltatune: every compared method diverged (full, bitfit)") and "compare.md" in error
    assert all(row["error"].startswith("training diverged at step") for row in rows(tmp_path / "out"))
    assert "| full | n/a |" in (tmp_path / "out" / "compare.md").read_text()
    with pytest.raises(TrainingDivergedError, match="every compared method diverged"):
        compare(CompareOptions(config, ["full"], rates, budget=Budget(max_steps=2), overwrite=True, progress=False))


def test_a_time_budget_that_is_not_finite_is_refused_before_training(tmp_path: Path) -> None:
    """An infinite budget never stops, and its learning rate never decays."""
    with pytest.raises(DeltaTuneError, match="finite and positive, got inf"):
        StopRule(steps=5, seconds=math.inf, clock=TrainingClock())
    with pytest.raises(DeltaTuneError, match="--time-budget must be finite and positive, got inf"):
        Budget(seconds=math.inf)
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", arch="bert", max_steps=1))
    with pytest.raises(DeltaTuneError, match="finite and positive, got inf"):
        deltatune.train.train(config, progress=False, time_budget=math.inf)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_the_pre_check_reads_a_headerless_table_as_training_does(tmp_path: Path) -> None:
    """`header: false` with `column_names`: the comparison reads the file that `deltatune train` reads."""
    table = tmp_path / "train.tsv"
    table.write_text("".join(f"{row['text']}\t{row['label']}\n" for row in records("seq-cls")), encoding="utf-8")
    layout = {"header": False, "column_names": ["text", "label"], "train_file": table, "eval_file": table}
    config = task_config(tmp_path, "seq-cls", arch="bert", max_steps=1, **layout)
    assert main(["compare", str(config), "--methods", "bitfit", "--quiet"]) == 0
    (row,) = rows(tmp_path / "out")
    assert row["error"] is None and row["steps"] == 1 and row["metric"] is not None


def test_a_method_whose_evaluation_fails_is_a_failed_row_the_next_method_runs_and_the_comparison_fails(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The finished methods' results of a long comparison are not lost to one method's failed evaluation: its
    row says why (its adapter is saved), the others run and are written, and the exit status is non-zero."""
    config = task_config(tmp_path, "seq-cls", arch="bert")
    real_evaluate, calls = loop_module.evaluate, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop_module, "evaluate", first_fails)
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "lora,bitfit", "--max-steps", "1", "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    out = tmp_path / "out"
    assert error.startswith("deltatune: ") and "lora" in error and str(out / "compare.md") in error, error
    failed, trained = rows(out)
    assert failed["status"] == "failed" and failed["metric"] is None and failed["steps"] is None
    assert "final evaluation failed (RuntimeError: CUDA out of memory)" in failed["error"]
    assert str(out / "lora" / "adapter") in failed["error"] and (out / "lora" / "adapter").is_dir()
    assert trained["status"] == "trained" and trained["error"] is None and trained["metric"] is not None
    written = (out / "compare.md").read_text()
    assert "| lora | n/a |" in written and "lora (failed): the trained adapter is saved at" in written
