"""Where `deltatune compare` writes: only inside its output_dir and never through a link. A symlink at
compare.md, compare.json or compare.png is refused in one line before any method trains, whatever
`--overwrite` says; the results are new files that take their names (a hard link's other name keeps its
contents); and a comparison that replaces an earlier one and stops before its end leaves no table of the
earlier one beside method folders that now hold other runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deltatune.train.compare as compare_module
from deltatune.train.cli import main
from deltatune.train.compare_report import COMPARE_FILES
from test_train_outputs_links import outside, refusal, tree, users_files
from training_fixtures import task_config

pytestmark = pytest.mark.xdist_group("compare")

LINKS = {"dangling": "elsewhere/result", "to-a-users-file": "home/.bashrc"}
"""Where a link at a compare file points (in the test's folder)."""


def compare_bitfit(config: Path, *arguments: str) -> int:
    return main(["compare", str(config), "--methods", "bitfit", "--max-steps", "1", "--quiet", *arguments])


@pytest.mark.parametrize("name", COMPARE_FILES)
@pytest.mark.parametrize("target", list(LINKS.values()), ids=list(LINKS))
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["fresh", "overwrite"])
def test_a_link_at_a_compare_file_is_refused_before_any_method_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, target: str, overwrite: list[str]
) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", output_dir=tmp_path / "out", eval_batch_size=8)
    users_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(tmp_path / target)
    before = tree(tmp_path)
    capsys.readouterr()
    assert compare_bitfit(config, *overwrite) == 2
    error = refusal(capsys)
    assert f"{out / name} is a link" in error and "never through a link" in error, error
    assert tree(tmp_path) == before


def test_the_plot_replaces_a_hard_linked_compare_png_and_leaves_the_file_it_shares_as_it_was(tmp_path: Path) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", output_dir=tmp_path / "out", eval_batch_size=8)
    users_files(tmp_path)
    out = tmp_path / "out"
    assert compare_bitfit(config) == 0
    (out / "compare.png").unlink()
    os.link(tmp_path / "home" / ".bashrc", out / "compare.png")
    before = outside(tmp_path)
    assert compare_bitfit(config, "--overwrite") == 0
    assert outside(tmp_path) == before
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_a_compare_file_that_is_a_folder_is_refused_before_any_method_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = task_config(tmp_path, "seq-cls", arch="bert", output_dir=tmp_path / "out", eval_batch_size=8)
    (tmp_path / "out" / "compare.md").mkdir(parents=True)
    capsys.readouterr()
    assert compare_bitfit(config, "--overwrite") == 2
    error = refusal(capsys)
    assert f"{tmp_path / 'out' / 'compare.md'} is not a file" in error, error
    assert not (tmp_path / "out" / "bitfit").exists()


def test_a_replacing_comparison_stopped_before_its_end_leaves_no_earlier_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earlier comparison's files go before the first method trains: a Ctrl-C (a kill, a crash) during the
    new one leaves no table describing runs its method folders no longer hold."""
    config = task_config(tmp_path, "seq-cls", arch="bert", output_dir=tmp_path / "out", eval_batch_size=8)
    assert compare_bitfit(config) == 0
    assert all((tmp_path / "out" / name).is_file() for name in COMPARE_FILES)

    def stopped(*arguments: object, **keywords: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "train", stopped)
    assert compare_bitfit(config, "--overwrite") == 130
    assert [name for name in COMPARE_FILES if os.path.lexists(tmp_path / "out" / name)] == []
