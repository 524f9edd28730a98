"""The command line shows deltatune's warnings as one line each, other libraries' in Python's form."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from deltatune.errors import CutInputsWarning
from deltatune.train.cli_warnings import one_line_warnings
from training_fixtures import task_config


def test_deltatune_warnings_are_formatted_as_one_line_and_others_keep_their_place() -> None:
    here = str(Path(__file__))
    with one_line_warnings():
        ours = warnings.formatwarning("three records were cut", CutInputsWarning, here, 7)
        raised_inside = warnings.formatwarning("a notice", UserWarning, str(Path(warnings.__file__)), 7)
        theirs = warnings.formatwarning("a library's notice", DeprecationWarning, here, 7)
    after = warnings.formatwarning("after the command", CutInputsWarning, here, 7)
    assert ours == "deltatune: warning: three records were cut\n"
    assert raised_inside.startswith(str(Path(warnings.__file__)))
    assert theirs.startswith(f"{here}:7: DeprecationWarning: a library's notice")
    assert after.startswith(f"{here}:7: CutInputsWarning: after the command")


def test_a_training_run_shows_its_notice_as_one_line(tmp_path: Path) -> None:
    """max_length=4 cuts the seq-cls texts: the command's stderr has the notice as one line, with no file,
    line or source line of deltatune's."""
    config = task_config(tmp_path, "seq-cls", max_length=4, max_steps=1)
    source = Path(__file__).resolve().parent.parent / "src"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.train.cli", "train", str(config), "--quiet"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [notice] = [line for line in done.stderr.splitlines() if "max_length=4" in line]
    assert notice.startswith("deltatune: warning: ") and "records have a text longer than max_length=4" in notice
    assert "deltatune/train" not in done.stderr
