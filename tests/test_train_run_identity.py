"""A checkpoint records the run it belongs to: `--resume` continues only a run with the same settings
that change the math (and the same training examples), and names the settings that differ; a new run
never mixes with another run's work in its output folder unless told to overwrite it, and an
overwrite removes the old checkpoints; `save_total_limit` keeps only the newest checkpoints."""

from __future__ import annotations

import json
import shutil

from deltatune.train.cli import main
from deltatune.train.demo import DemoOptions, run_demo
from training_fixtures import model_folder, records, task_config, write_jsonl

SETTINGS = {"batch_size": 4, "max_steps": 8, "save_every": 3, "scheduler": "linear", "eval_file": None}


def checkpoints(output_dir) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir())


def interrupted_run(tmp_path):
    """A config, and its output folder as a run killed after the checkpoint of step 6 leaves it."""
    config = task_config(tmp_path, "causal-lm", **SETTINGS)
    assert main(["train", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    return config, out


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_resume_refuses_a_checkpoint_of_a_run_with_other_settings_and_names_them(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", "learning_rate=0.001", "adapter.r=2"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("deltatune: --resume: ") and "learning_rate: 0.02 → 0.001" in line and "adapter" in line, (
        line
    )
    assert not (out / "adapter").exists()


def test_resume_refuses_a_checkpoint_trained_on_other_examples(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    write_jsonl(tmp_path / "causal-lm.jsonl", records("causal-lm", seed=1))
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", str(out / "checkpoints" / "step-000003")]) == 2
    assert "training_data" in last_error_line(capsys)


def test_resume_refuses_a_checkpoint_that_records_no_run(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    state_file = out / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state.pop("run", None)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    assert "does not record which run wrote it" in last_error_line(capsys)


def test_resume_accepts_changes_to_settings_that_keep_the_math(tmp_path) -> None:
    config, out = interrupted_run(tmp_path)
    assert (
        main(
            [
                "train",
                str(config),
                "--quiet",
                "save_every=2",
                "log_every=2",
                "max_new_tokens=3",
                "device=cpu",
                "--resume",
            ]
        )
        == 0
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_new_run_into_a_folder_holding_another_run_is_refused(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    before = checkpoints(out)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "learning_rate=0.001"]) == 2
    line = last_error_line(capsys)
    assert "already holds" in line and "--resume" in line and "overwrite_output_dir" in line, line
    assert checkpoints(out) == before and not (out / "adapter").exists()


def test_overwrite_output_dir_removes_the_previous_runs_checkpoints(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["train", str(config), "--quiet", "overwrite_output_dir=true", "max_steps=4", "save_every=2"]) == 0
    assert checkpoints(out) == ["step-000002"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "max_steps=4", "save_every=2", "--resume"]) == 0


def test_save_total_limit_keeps_only_the_newest_checkpoints(tmp_path) -> None:
    config = task_config(tmp_path, "causal-lm", **{**SETTINGS, "save_every": 1, "save_total_limit": 2})
    assert main(["train", str(config), "--quiet"]) == 0
    assert checkpoints(tmp_path / "out") == ["step-000006", "step-000007"]


def test_the_demo_runs_again_into_its_own_folder(tmp_path) -> None:
    options = DemoOptions(
        out=str(tmp_path / "demo"), model=str(model_folder(tmp_path, "causal-lm")), steps=2, examples=4
    )
    run_demo(options)
    run_demo(options)
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["steps"] == 2


def test_resume_refuses_a_checkpoint_of_other_base_model_weights_at_the_same_path(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    model_folder(tmp_path, "causal-lm", seed=1)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    assert "base_model_weights" in last_error_line(capsys)


def edit_model_config(tmp_path, **settings) -> None:
    """Rewrite the tiny model folder's config.json with `settings` changed, its weights files untouched."""
    path = tmp_path / "tiny-causal-lm" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **settings}), encoding="utf-8")


def test_resume_refuses_a_checkpoint_of_another_model_config_at_the_same_path_and_names_it(tmp_path, capsys) -> None:
    config, out = interrupted_run(tmp_path)
    edit_model_config(tmp_path, rms_norm_eps=0.5, hidden_act="relu")
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("deltatune: --resume: ") and "base_model_config.rms_norm_eps: 1e-06 → 0.5" in line, line
    assert 'base_model_config.hidden_act: "silu" → "relu"' in line, line
    assert not (out / "adapter").exists()


def test_resume_accepts_a_model_config_saved_again_by_another_release_with_the_same_settings(tmp_path) -> None:
    config, out = interrupted_run(tmp_path)
    edit_model_config(tmp_path, transformers_version="0.0.1", _name_or_path="elsewhere")
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_checkpoint_written_before_the_model_config_was_recorded_resumes_with_a_warning(tmp_path, caplog) -> None:
    """Its model config is unknown: it is not compared (the weights still are), and the log says so."""
    config, out = interrupted_run(tmp_path)
    state_file = out / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    fingerprint = state["run"]["fingerprint"]
    state["run"]["fingerprint"] = {name: value for name, value in fingerprint.items() if "model_config" not in name}
    assert len(state["run"]["fingerprint"]) < len(fingerprint)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    with caplog.at_level("WARNING", logger="deltatune"):
        assert main(["train", str(config), "--quiet", "--resume"]) == 0
    assert any("does not record the model's config.json" in message for message in caplog.messages), caplog.messages
