"""`deltatune merge MODEL ADAPTER OUT` never destroys its input: it never writes into the model or
adapter folder (by any path that leads there), replaces an existing non-empty OUT only with
`--overwrite`, and a merge that fails while writing leaves no half-written folder behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import transformers

import deltatune
import deltatune.file_system as file_system
from deltatune.train.cli import main
from training_fixtures import model_folder, save_float16_overflow, save_two_adapters


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def model_and_adapter(tmp_path) -> tuple[Path, Path]:
    model = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(
        transformers.AutoModelForCausalLM.from_pretrained(model), deltatune.LoraConfig(r=2, target_modules="all-linear")
    )
    delta_model.save(str(tmp_path / "adapter"))
    return model, tmp_path / "adapter"


OUTPUTS = {
    "the-model-folder": lambda model, adapter: model,
    "the-model-folder-by-another-path": lambda model, adapter: model.parent / "." / model.name / ".." / model.name,
    "a-link-to-the-model-folder": lambda model, adapter: _link(model),
    "a-folder-inside-the-model": lambda model, adapter: model / "merged",
    "a-folder-holding-the-model": lambda model, adapter: model.parent,
    "the-adapter-folder": lambda model, adapter: adapter,
}


def _link(target: Path) -> Path:
    link = target.parent / "link-to-model"
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_merge_never_writes_into_its_input_folders(output: str, model_and_adapter, capsys) -> None:
    model, adapter = model_and_adapter
    before = {folder: folder_digest(folder) for folder in (model, adapter)}
    out = OUTPUTS[output](model, adapter)
    for overwrite in ([], ["--overwrite"]):
        assert main(["merge", str(model), str(adapter), str(out), *overwrite]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("deltatune: ") and "never writes into its inputs" in err[-1], err
        assert {folder: folder_digest(folder) for folder in (model, adapter)} == before


def test_merge_refuses_a_non_empty_output_folder_unless_told_to_overwrite(model_and_adapter, tmp_path, capsys) -> None:
    model, adapter = model_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["merge", str(model), str(adapter), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]

    assert main(["merge", str(model), str(adapter), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_merge_into_an_empty_folder_needs_no_overwrite(model_and_adapter, tmp_path) -> None:
    model, adapter = model_and_adapter
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(model), str(adapter), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_merge_that_fails_while_writing_leaves_no_output_folder(
    model_and_adapter, tmp_path, monkeypatch, capsys
) -> None:
    model, adapter = model_and_adapter
    real_save = transformers.PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
    out = tmp_path / "merged"
    assert main(["merge", str(model), str(adapter), str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    "config",
    [
        deltatune.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False),
        deltatune.BitFitConfig(target_modules=["q_proj"], add_missing_bias=True),
    ],
    ids=["lora_bias", "add_missing_bias"],
)
def test_a_merge_that_adds_a_bias_the_architecture_cannot_load_is_refused_and_writes_nothing(
    config, tmp_path, capsys
) -> None:
    """Merged into a bias-free Llama layer, a trained bias becomes a new parameter: `save_pretrained`
    writes it and `from_pretrained` drops it, so the folder would reload with other outputs."""
    model = model_folder(tmp_path, "causal-lm")
    delta_model = deltatune.attach(transformers.AutoModelForCausalLM.from_pretrained(model), config)
    for parameter in delta_model.adapter_parameters("default"):
        parameter.data.normal_()
    delta_model.save(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert main(["merge", str(model), str(tmp_path / "adapter"), str(out)]) == 2
    assert "q_proj.bias" in capsys.readouterr().err
    assert not out.exists()


def test_merge_refuses_a_folder_of_several_adapters_before_loading_and_writes_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    """Merging would keep the active adapter (the first) and drop the others without a word."""
    import deltatune.train.models as models

    model = model_folder(tmp_path, "causal-lm")
    adapters = save_two_adapters(transformers.AutoModelForCausalLM.from_pretrained(model), tmp_path / "adapters")
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    capsys.readouterr()  # what the setup printed
    out = tmp_path / "merged"
    assert main(["merge", str(model), str(adapters), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 2 adapters (a, b)" in err[0] and str(adapters / "a") in err[0], err
    assert not out.exists()
    monkeypatch.undo()
    assert main(["merge", str(model), str(adapters / "a"), str(out)]) == 0  # the way it names


def test_merge_to_float16_refuses_a_weight_past_its_range_and_writes_nothing(tmp_path, capsys) -> None:
    """The merge runs in float32, where 9e4 is finite; cast to float16 it would be written as inf."""
    model = model_folder(tmp_path, "causal-lm")
    adapter = save_float16_overflow(
        transformers.AutoModelForCausalLM.from_pretrained(model), "q_proj", tmp_path / "adapter"
    )
    capsys.readouterr()  # what the setup printed
    out = tmp_path / "merged"
    assert main(["merge", str(model), str(adapter), str(out), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("deltatune: "), err
    assert "model.layers.0.self_attn.q_proj.weight" in last and "bfloat16" in last, last
    assert not out.exists()
    assert main(["merge", str(model), str(adapter), str(out), "--dtype", "bfloat16"]) == 0  # the way it names


INTERRUPTS = {
    "after-the-exchange": (True, 1),
    "between-the-renames": (False, 1),
    "after-both-renames": (False, 2),
}
"""Where a Ctrl-C lands in `merge --overwrite`: (the file system exchanges folders, the move of a folder in OUT's
parent after which it comes). Without an exchange (NFS, macOS) the old OUT is renamed aside, then the new one in."""


@pytest.mark.parametrize("interrupt", list(INTERRUPTS))
def test_an_interrupted_merge_overwrite_leaves_a_whole_model_at_out(
    interrupt: str, model_and_adapter, tmp_path, monkeypatch, capsys
) -> None:
    """After a Ctrl-C at any move, OUT holds the old model or the new one, or the next merge puts the old one back
    (and names where it lay): then it refuses to write over it without --overwrite, and leaves nothing hidden."""
    model, adapter = model_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(model), str(adapter), str(out)]) == 0
    merged = folder_digest(out)
    exchanges, interrupt_after = INTERRUPTS[interrupt]
    moves = []

    def counted(move):
        def move_then_maybe_interrupt(source, target, *args, **kwargs):
            result = move(source, target, *args, **kwargs)
            if out.parent in (Path(source).parent, Path(target).parent):
                moves.append(target)
                if len(moves) == interrupt_after:
                    raise KeyboardInterrupt
            return result

        return move_then_maybe_interrupt

    monkeypatch.setattr(os, "rename", counted(os.rename))
    monkeypatch.setattr(os, "replace", counted(os.replace))
    real_exchange = file_system.exchange
    monkeypatch.setattr(file_system, "exchange", counted(real_exchange) if exchanges else lambda first, second: False)
    assert main(["merge", str(model), str(adapter), str(out), "--overwrite"]) == 130
    monkeypatch.undo()
    capsys.readouterr()

    assert main(["merge", str(model), str(adapter), str(out)]) == 2
    said = capsys.readouterr()
    assert "--overwrite" in said.err
    if interrupt == "between-the-renames":  # OUT was absent: the old model is put back, and where it lay is said
        assert f"note: {out} was put back from {tmp_path / '.merged.deltatune-old'}" in said.out, said.out
    assert folder_digest(out) == merged
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_merge_refuses_an_adapter_recorded_for_other_base_weights_unless_allowed(
    model_and_adapter, tmp_path, capsys
) -> None:
    """A merged folder of an adapter on weights it was not trained on is another model under the adapter's name:
    refused in one line, nothing written; `--allow-other-base` merges it, with the warning."""
    _, adapter = model_and_adapter
    (tmp_path / "other").mkdir()
    other = model_folder(tmp_path / "other", "causal-lm", seed=1)  # the same architecture, other weights
    out = tmp_path / "merged"
    capsys.readouterr()  # the fixtures' own output
    assert main(["merge", str(other), str(adapter), str(out)]) == 2
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]
    assert "Traceback" not in error and last.startswith("deltatune: ") and "other base weights" in last, error
    assert "--allow-other-base" in last
    assert not out.exists()
    with pytest.warns(deltatune.BaseWeightsWarning):
        assert main(["merge", str(other), str(adapter), str(out), "--allow-other-base"]) == 0
    assert (out / "config.json").is_file()
