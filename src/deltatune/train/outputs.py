"""Where commands write: never into their inputs, never over earlier work unless told to, never half.

Training (`output_dir`): before anything is loaded the folder must be writable (it is created, and a
probe file written and removed), and it must not hold another run's work (`RUN_ENTRIES`) unless the
run continues that work (`--resume`, which checks it is the same run) or replaces it
(`overwrite_output_dir`: those entries, and nothing else, are removed when training starts).

Merging (`deltatune merge MODEL ADAPTER OUT`): OUT must not be, lie inside or contain an input folder
(compared after resolving links), and must be absent or empty unless `overwrite`. The merged folder
is written into a staging folder beside OUT, which then takes OUT's place: a failure leaves OUT as
it was and no staging behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputFolderError
from .checkpoint import ADAPTER_FOLDER, CHECKPOINTS_FOLDER
from .config import TrainConfig
from .report import METRICS_FILE, PLOT_FILE

RUN_ENTRIES = (ADAPTER_FOLDER, CHECKPOINTS_FOLDER, METRICS_FILE, PLOT_FILE)
"""What a training run writes into its output_dir."""


def check_output_dir(config: TrainConfig, resume: str | Path | bool | None) -> None:
    """The checks on a run's output_dir that come before the model loads."""
    folder = Path(config.output_dir)
    _check_writable(folder)
    found = previous_run(folder)
    if found and not resume and not config.overwrite_output_dir:
        raise OutputFolderError(
            f"output_dir {folder} already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with overwrite_output_dir=true, or give another output_dir"
        )


def _check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file into it, or say in one line why that cannot be done."""
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output_dir {folder} cannot be written: it is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deltatune-probe-"):
            pass
    except OSError as error:
        raise OutputFolderError(
            f"output_dir {folder} cannot be written ({error.strerror or error}); give a folder you can write to"
        ) from None


def previous_run(folder: Path) -> list[str]:
    """The entries of `RUN_ENTRIES` that are in `folder`."""
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def clear_previous_run(folder: Path) -> None:
    """Remove what an earlier run left in `folder` (its adapter, checkpoints, metrics and plot)."""
    for name in previous_run(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


RELATIONS: dict[str, Callable[[Path, Path], bool]] = {
    "is": lambda out, source: out == source,
    "is inside": lambda out, source: source in out.parents,
    "contains": lambda out, source: out in source.parents,
}
"""How an output folder can meet an input folder (both resolved); each is refused."""


def check_merge_output(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse an OUT that meets an input folder, that is a file, or (without `overwrite`) that holds files."""
    target = out.resolve()
    for role, folder in inputs.items():
        source = folder.resolve()
        relation = next((words for words, holds in RELATIONS.items() if holds(target, source)), None)
        if relation:
            raise OutputFolderError(
                f"merge never writes into its inputs: OUT {out} {relation} the {role} folder {folder}; give a new "
                "folder for the merged model"
            )
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"OUT {out} is a file; give a folder for the merged model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(
            f"OUT {out} already exists and is not empty; pass --overwrite to replace it, or give a new folder"
        )


@contextlib.contextmanager
def replaced_folder(out: Path) -> Iterator[Path]:
    """A staging folder beside `out` to write into; when the block ends without error it takes the
    place of `out` (an old `out` is removed), else it is removed and `out` stays as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise OutputFolderError(
            f"cannot write beside {out} ({error.strerror or error}); give a folder you can write to"
        ) from None
    try:
        yield staging
        _put_in_place(staging, out)
    except OSError as error:
        raise OutputFolderError(f"writing {out} failed ({error.strerror or error}); {out} was left as it was") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _put_in_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`, moving an existing `out` aside first and removing it after."""
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(aside / out.name, out)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
