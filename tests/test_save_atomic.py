"""A save replaces the whole save folder at once and leaves it holding exactly what was saved: a reader
sees the old adapters or the new ones, never a mix; staging of killed saves goes at the next save;
files the save did not write stay. (Saves killed for real, and two processes saving at once:
test_save_faults.py.)"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

import deltatune
import deltatune.atomic
import deltatune.file_system
import deltatune.io
from save_checks import leftovers
from tiny_models import build, run


class Killed(BaseException):
    """Stands in for a kill: nothing after it runs in the save (only its `finally` blocks)."""


def lora(alpha: int = 4) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(r=2, lora_alpha=alpha, target_modules=["net.0", "net.2"], init_lora_weights=False)


def delta_model(names: list[str], seed: int = 0, alpha: int = 4) -> deltatune.DeltaModel:
    """Adapters `names` on the tiny MLP, with values drawn from `seed`."""
    model = build("mlp")
    torch.manual_seed(seed)
    result = deltatune.attach(model, lora(alpha), name=names[0])
    for name in names[1:]:
        result.add(name, lora(alpha))
    return result


def outputs(model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    """Each adapter's output on the MLP's fixed inputs."""
    return {name: run(model.activate(name), "mlp").detach() for name in model.configs}


def loaded_outputs(folder: Path) -> dict[str, torch.Tensor]:
    return outputs(deltatune.load(build("mlp"), str(folder)))


def same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------- a save is one step
def test_a_save_stopped_between_two_renames_leaves_the_old_adapter_or_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "adapter"
    old, new = delta_model(["default"], seed=1, alpha=4), delta_model(["default"], seed=2, alpha=16)
    old.save(str(folder))
    renames: list[tuple] = []

    def stopping_at_the_second(real):
        def rename(*args, **kwargs):
            renames.append(args)
            if len(renames) == 2:
                raise Killed
            return real(*args, **kwargs)

        return rename

    monkeypatch.setattr(os, "replace", stopping_at_the_second(os.replace))
    monkeypatch.setattr(os, "rename", stopping_at_the_second(os.rename))
    with contextlib.suppress(Killed):
        new.save(str(folder))
    monkeypatch.undo()
    found = loaded_outputs(folder)
    assert same(found, outputs(old)) or same(found, outputs(new)), "the folder holds parts of two saves"


def test_a_load_that_overlaps_a_save_reads_one_adapter_not_a_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process saves between the load's reading of the config and of the weights."""
    folder = tmp_path / "adapter"
    old, new = delta_model(["default"], seed=1, alpha=4), delta_model(["default"], seed=2, alpha=16)
    old.save(str(folder))
    real_read = deltatune.io.read_tensors
    saved: list[bool] = []

    def read_after_a_save(path: Path) -> dict[str, torch.Tensor]:
        if not saved:
            saved.append(True)
            new.save(str(folder))
        return real_read(path)

    monkeypatch.setattr(deltatune.io, "read_tensors", read_after_a_save)
    found = loaded_outputs(folder)
    assert same(found, outputs(new)) or same(found, outputs(old)), (
        "the load combined the old config with the new weights"
    )


# ----------------------------------------------------------------------------- exactly what was saved
def test_saving_fewer_adapters_into_a_folder_leaves_only_those(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["a", "b"], seed=1).save(str(folder))
    second = delta_model(["a", "c"], seed=2)
    second.save(str(folder))
    assert same(loaded_outputs(folder), outputs(second))


def test_a_multi_adapter_save_over_a_single_adapter_folder_loads_only_the_new_adapters(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["default"], seed=1).save(str(folder))
    second = delta_model(["a", "b"], seed=2)
    second.save(str(folder))
    assert same(loaded_outputs(folder), outputs(second))


def test_a_single_adapter_save_over_a_multi_adapter_folder_removes_the_old_subfolders(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["a", "b"], seed=1).save(str(folder))
    second = delta_model(["default"], seed=2)
    second.save(str(folder))
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert same(loaded_outputs(folder), outputs(second))


def test_a_save_keeps_the_files_it_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    user_files = {
        "README.md": "# my adapter\n",
        "notes/todo.txt": "train longer\n",
        ".gitattributes": "*.safetensors lfs\n",
    }
    for name, text in user_files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    for names in (["default"], ["a", "b"], ["default"], ["c"]):
        saved = delta_model(names)
        saved.save(str(folder), names=names)
        assert {name: (folder / name).read_text() for name in user_files} == user_files
        assert same(loaded_outputs(folder), outputs(saved))


# ----------------------------------------------------------------------------- staging of killed saves
def killed_save_leftovers(folder: Path) -> list[Path]:
    """What killed saves leave: staging beside a single-adapter folder (half a weights file) and, in a
    folder of several adapters, the staging of one of them (both files written, as killed before the renames)."""
    beside = folder.parent / f".{folder.name}.deltatune-0123456789abcdef.partial"
    beside.mkdir()
    (beside / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    inside = folder / ".a.deltatune-fedcba9876543210.partial"
    inside.mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (inside / file).write_bytes((folder / "a" / file).read_bytes())
    return [beside, inside]


def test_load_of_a_multi_adapter_folder_skips_staging_folders(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    saved = delta_model(["a", "b"])
    saved.save(str(folder))
    killed_save_leftovers(folder)
    assert same(loaded_outputs(folder), outputs(saved))


def test_the_next_save_removes_the_staging_of_killed_saves(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["a", "b"]).save(str(folder))
    killed_save_leftovers(folder)
    delta_model(["a", "b"], seed=3).save(str(folder))
    assert leftovers(folder) == []


def test_a_save_leaves_other_programs_partial_files_beside_it(tmp_path: Path) -> None:
    """Only deltatune's own staging names go: a download's or a backup's `.partial` entry stays."""
    (tmp_path / ".video.download.partial").write_text("other tool")
    (tmp_path / ".backup.20261201.partial").mkdir()
    (tmp_path / ".backup.20261201.partial" / "data.bin").write_text("x" * 100)
    (tmp_path / ".adapter.deltatune-0123456789abcdef.partial.mine").write_text("not staging")
    delta_model(["default"]).save(str(tmp_path / "adapter"))
    assert (tmp_path / ".video.download.partial").read_text() == "other tool"
    assert (tmp_path / ".backup.20261201.partial" / "data.bin").read_text() == "x" * 100
    assert (tmp_path / ".adapter.deltatune-0123456789abcdef.partial.mine").is_file()


def test_a_save_never_removes_a_user_folder_or_file_named_like_one_of_its_adapters(tmp_path: Path) -> None:
    folder = tmp_path / "multi"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "my_precious.txt").write_text("user data")
    (folder / "b").write_text("user file")
    for names in (["a", "notes"], ["a", "b"]):
        with pytest.raises(deltatune.AdapterFileError, match=f"{names[1]}.*not an adapter"):
            delta_model(names).save(str(folder))
    assert (folder / "notes" / "my_precious.txt").read_text() == "user data"
    assert (folder / "b").read_text() == "user file"
    assert sorted(os.listdir(folder)) == ["b", "notes"] and leftovers(folder) == []


def test_a_save_of_one_adapter_name_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="'a' more than once"):
        delta_model(["a", "b"]).save(str(tmp_path / "out"), names=["a", "a"])
    assert not (tmp_path / "out").exists()


def test_a_load_by_a_name_the_folder_lacks_names_the_adapters_it_holds(tmp_path: Path) -> None:
    delta_model(["a", "b"]).save(str(tmp_path / "multi"))
    with pytest.raises(deltatune.AdapterFileError, match="no adapter 'c'.*'a', 'b'"):
        deltatune.load(build("mlp"), str(tmp_path / "multi"), name="c")


# ----------------------------------------------------------------------------- file systems without an atomic exchange
def test_without_exchange_a_save_stopped_between_its_renames_is_named_by_load_and_undone_by_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "adapter"
    old, new = delta_model(["default"], seed=1), delta_model(["default"], seed=2)
    old.save(str(folder))
    (folder / "README.md").write_text("mine")
    monkeypatch.setattr(deltatune.file_system, "exchange", lambda first, second: False)
    real_rename = os.rename

    def stop_before_the_new_folder_moves_in(source, target):
        if Path(target).name == folder.name:
            raise Killed
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", stop_before_the_new_folder_moves_in)
    with contextlib.suppress(Killed):
        new.save(str(folder))
    monkeypatch.setattr(os, "rename", real_rename)
    with pytest.raises(
        deltatune.AdapterFileError,
        match=r"a save into it was killed; the adapter saved before is in .*\.adapter\.deltatune-old",
    ):
        deltatune.load(build("mlp"), str(folder))
    new.save(str(folder))
    assert same(loaded_outputs(folder), outputs(new))
    assert (folder / "README.md").read_text() == "mine"
    assert leftovers(folder) == []


def test_without_exchange_saves_still_replace_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deltatune.file_system, "exchange", lambda first, second: False)
    folder = tmp_path / "adapters"
    delta_model(["a", "b"], seed=1).save(str(folder))
    second = delta_model(["a", "c"], seed=2)
    second.save(str(folder))
    assert same(loaded_outputs(folder), outputs(second))
    assert leftovers(folder) == []


# ----------------------------------------------------------------------------- what replacing a folder must not break
def test_saving_into_the_working_directory_keeps_it_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    saved = delta_model(["default"])
    saved.save(".")
    saved.save(".")
    assert Path(os.getcwd()) == folder.resolve()
    assert same(loaded_outputs(Path(".")), outputs(saved))


def test_a_save_through_a_symlink_replaces_the_real_folder_and_keeps_its_permissions(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o750)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    saved = delta_model(["a", "b"])
    saved.save(str(link))
    assert link.is_symlink() and stat.S_IMODE(os.stat(real).st_mode) == 0o750
    assert same(loaded_outputs(real), outputs(saved))


def test_writing_files_into_a_folder_keeps_its_other_entries_and_removes_staging_of_killed_writes(
    tmp_path: Path,
) -> None:
    """`write_files` (a run's metrics, a checkpoint's files) adds files to a folder that stays."""
    folder = tmp_path / "run"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "kept.txt").write_text("kept")
    (folder / ".metrics.json.deltatune-00112233445566aa.partial").write_text('{"half')
    deltatune.atomic.write_files(folder, {"metrics.json": deltatune.atomic.json_writer({"loss": 1.0})})
    assert (folder / "adapter" / "kept.txt").read_text() == "kept"
    assert (folder / "metrics.json").read_text() == '{\n  "loss": 1.0\n}\n'
    assert leftovers(folder) == []


def test_a_save_keeps_a_subfolder_holding_files_no_save_writes(tmp_path: Path) -> None:
    """A trainer's `checkpoint-N/` holds an adapter and its optimizer and trainer state: a later save into
    the parent folder (`trainer.save_model()` into `output_dir`) keeps it whole."""
    folder = tmp_path / "run"
    delta_model(["default"], seed=1).save(str(folder / "checkpoint-3"))
    state = {"optimizer.pt": b"optimizer state", "trainer_state.json": b"{}", "rng_state.pth": b"rng"}
    for name, content in state.items():
        (folder / "checkpoint-3" / name).write_bytes(content)
    kept = {path.name: path.read_bytes() for path in (folder / "checkpoint-3").iterdir()}
    final = delta_model(["default"], seed=2)
    final.save(str(folder))
    assert {path.name: path.read_bytes() for path in (folder / "checkpoint-3").iterdir()} == kept
    assert same(loaded_outputs(folder), outputs(final))


def test_a_users_readme_in_an_adapter_subfolder_survives_every_later_save(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["a", "b"], seed=1).save(str(folder))
    (folder / "a" / "README.md").write_text("# my notes on adapter a\n")
    delta_model(["a", "b"], seed=2).save(str(folder))  # rewrites a/, keeping its README as the card
    assert (folder / "a" / "README.md").read_text() == "# my notes on adapter a\n"
    delta_model(["b", "c"], seed=3).save(str(folder))  # no longer names a
    assert (folder / "a" / "README.md").read_text() == "# my notes on adapter a\n"
    delta_model(["default"], seed=4).save(str(folder))  # one adapter into the parent
    assert (folder / "a" / "README.md").read_text() == "# my notes on adapter a\n"
    assert not (folder / "b").exists() and not (folder / "c").exists()  # saves' own subfolders still go


def test_a_multi_save_refuses_to_rewrite_a_subfolder_holding_a_users_file(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    delta_model(["a", "b"], seed=1).save(str(folder))
    (folder / "a" / "notes.txt").write_text("train longer\n")
    with pytest.raises(deltatune.AdapterFileError, match=r"notes\.txt|adapters/a"):
        delta_model(["a", "b"], seed=2).save(str(folder))
    assert (folder / "a" / "notes.txt").read_text() == "train longer\n"
