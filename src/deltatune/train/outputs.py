"""Where commands write: never into their inputs, never over earlier work unless told to, never half.

Training (`output_dir`): before anything is loaded the folder must be writable (it is created, and a
probe file written and removed), and it must not hold another run's work (`RUN_ENTRIES`) unless the
run continues that work (`--resume`, which checks it is the same run) or replaces it
(`overwrite_output_dir`: those entries, and nothing else, are removed when training starts).

A run never removes what it did not write. When it starts afresh it writes `RUN_RECORD` into output_dir,
naming the entries it writes there; an overwrite removes an entry only where a record names it and it
holds only what a run writes there (`RUN_CONTENT`: checkpoint folders `step-N` of checkpoint files and an
adapter folder, an adapter folder of a save's files, a metrics file, a plot). Any other entry of those
names (a user's own `checkpoints/`, a note put into the adapter folder, a folder a deltatune release before
the record wrote) is refused in one line naming it, before the model loads, and nothing is removed.

A run writes only inside output_dir and never through a link: a run entry, anything inside one, the record, the
folder TensorBoard or MLflow writes there (`runs`, `mlruns`, or anything inside them) or W&B's folder (`wandb`
itself: W&B keeps links of its own inside it) that is a symlink (dangling or not) is refused in one line naming
it, before the model loads, on a resume too, whatever `report_to` and the trackers' environment variables say.
Every file a run writes there is a new file that takes its name, so the other name of a hard link keeps its
contents.

Merging (`deltatune merge MODEL ADAPTER OUT`): OUT must not be, lie inside or contain an input folder
(compared after resolving links), and must be absent or empty unless `overwrite`. The merged folder
is written into a staging folder beside OUT, which then takes OUT's place: a failure leaves OUT as
it was and no staging behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..atomic import is_helper
from ..errors import OutputFolderError
from ..io import _written_by_saves
from .checkpoint import (
    ADAPTER_FOLDER,
    BUFFERS_FILE,
    CHECKPOINTS_FOLDER,
    OPTIMIZER_FILE,
    RANDOM_FILE,
    STATE_FILE,
    STEP_STATE_FILE,
    TRAINABLE_FILE,
)
from .config import TrainConfig
from .report import METRICS_FILE, PLOT_FILE
from .tracking.mlflow_log import MLRUNS_FOLDER
from .tracking.tensorboard_log import RUNS_FOLDER
from .tracking.wandb_log import WANDB_FOLDER

RUN_ENTRIES = (ADAPTER_FOLDER, CHECKPOINTS_FOLDER, METRICS_FILE, PLOT_FILE)
"""What a training run writes into its output_dir."""

RUN_RECORD = ".deltatune-run.json"
"""The record a run starting afresh writes into its output_dir, `{"written_by": "deltatune", "entries": [...]}`:
the entries of `RUN_ENTRIES` it writes there, the only ones a later overwrite may remove."""

CHECKPOINT_FILES = {TRAINABLE_FILE, OPTIMIZER_FILE, RANDOM_FILE, STEP_STATE_FILE, BUFFERS_FILE, STATE_FILE}
"""The files of a checkpoint folder besides its adapter folder (`checkpoint.py`)."""


def _foreign_in_adapter(path: Path) -> list[Path]:
    """`path` itself unless it is an adapter folder holding only what a save writes (`io`)."""
    return [] if _written_by_saves(path) else [path]


def _foreign_in_checkpoint(path: Path) -> list[Path]:
    """`path` itself unless it is a checkpoint folder `step-N` holding only checkpoint files, its adapter
    folder and a save's helper entries."""
    if path.is_symlink() or not path.is_dir() or not path.name.removeprefix("step-").isdigit():
        return [path]
    for child in path.iterdir():
        ours = child.name in CHECKPOINT_FILES and child.is_file() and not child.is_symlink()
        if not (ours or is_helper(child.name) or (child.name == ADAPTER_FOLDER and not _foreign_in_adapter(child))):
            return [path]
    return []


def _foreign_in_checkpoints(path: Path) -> list[Path]:
    """What in a `checkpoints` folder no run wrote (the folder itself, if it is none)."""
    if path.is_symlink() or not path.is_dir():
        return [path]
    return [found for child in path.iterdir() if not is_helper(child.name) for found in _foreign_in_checkpoint(child)]


def _foreign_file(path: Path) -> list[Path]:
    return [] if path.is_file() else [path]


RUN_CONTENT: dict[str, Callable[[Path], list[Path]]] = {
    ADAPTER_FOLDER: _foreign_in_adapter,
    CHECKPOINTS_FOLDER: _foreign_in_checkpoints,
    METRICS_FILE: _foreign_file,
    PLOT_FILE: _foreign_file,
}
"""Entry of `RUN_ENTRIES` → what in it a run did not write (nothing: the entry holds only a run's work)."""


def check_output_dir(config: TrainConfig, resume: str | Path | bool | None) -> None:
    """The checks on a run's output_dir that come before the model loads."""
    folder = Path(config.output_dir)
    check_writable(folder)
    found = previous_run(folder)
    if found and not resume and not config.overwrite_output_dir:
        raise OutputFolderError(
            f"output_dir {folder} already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with overwrite_output_dir=true, or give another output_dir"
        )
    if not resume:
        check_replaceable(folder)


def check_replaceable(folder: Path) -> None:
    """Refuse, naming them, the entries of `RUN_ENTRIES` in `folder` that a run starting there may not remove:
    those no record names, and what a run does not write inside those it names."""
    recorded = _recorded_entries(folder)
    foreign = [
        _shown(path, folder)
        for name in previous_run(folder)
        for path in ([folder / name] if name not in recorded else RUN_CONTENT[name](folder / name))
    ]
    if foreign:
        raise OutputFolderError(
            f"output_dir {folder} holds what no deltatune run wrote there: {', '.join(foreign)} (a new run removes "
            f"only what a run's {RUN_RECORD} and its file layout show it wrote); move it out of the folder, or give "
            "another output_dir"
        )


def _shown(path: Path, folder: Path) -> str:
    name = path.relative_to(folder).as_posix()
    return f"{name}/" if path.is_dir() and not path.is_symlink() else name


def _recorded_entries(folder: Path) -> set[str]:
    """The entries `folder`'s run record names (none where there is no readable record)."""
    try:
        record = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(record, dict) or record.get("written_by") != "deltatune":
        return set()
    entries = record.get("entries")
    return {name for name in entries if name in RUN_ENTRIES} if isinstance(entries, list) else set()


def check_writable(folder: Path) -> None:
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
    """The entries of `RUN_ENTRIES` that are in `folder` (a dangling link counts), once `check_no_links` found
    no link among them."""
    check_no_links(folder)
    return [name for name in RUN_ENTRIES if os.path.lexists(folder / name)]


LINKS_REFUSED = (*RUN_ENTRIES, RUN_RECORD, RUNS_FOLDER, MLRUNS_FOLDER, WANDB_FOLDER)
"""What a run writes in its output_dir, where no link may be: its entries, its record, the trackers' folders."""

KEEPS_ITS_OWN_LINKS = frozenset({WANDB_FOLDER})
"""The folders whose writer keeps links of its own inside them, where only the folder itself is refused as a link:
W&B's `latest-run`, `debug.log` and `debug-internal.log` in `wandb/`, each put in the place of what was there
(never written through), and each run written into a folder of a new name."""


def check_no_links(folder: Path, names: Iterable[str] = LINKS_REFUSED) -> None:
    """Refuse, naming it, a symlink (dangling or not) at an entry `names` names in `folder`, at a folder on the way
    to one (`data` of `data/train.jsonl`) or inside one (but for the folders of `KEEPS_ITS_OWN_LINKS`). By default
    `names` is what a run writes there (`LINKS_REFUSED`). A run writes only inside its output_dir, and never
    through a link."""
    link = next((path for name in names for path in _links(folder, name)), None)
    if link is not None:
        raise OutputFolderError(
            f"{link} is a link (to {os.readlink(link)}): a run writes only inside output_dir and never through a "
            "link; put what it points to in its place, or remove it, or give another output_dir"
        )


def _links(folder: Path, name: str) -> Iterator[Path]:
    """The first symlink at `folder / name` or at a folder on the way to it, else those under it unless its writer
    keeps links of its own there (none is followed)."""
    parts = Path(name).parts
    on_the_way = (folder.joinpath(*parts[:end]) for end in range(1, len(parts) + 1))
    link = next((path for path in on_the_way if path.is_symlink()), None)
    if link is not None:
        yield link
        return
    if name in KEEPS_ITS_OWN_LINKS:
        return
    for parent, folders, files in os.walk(folder / name):
        yield from (Path(parent, entry) for entry in sorted(folders + files) if os.path.islink(Path(parent, entry)))


def clear_previous_run(folder: Path) -> None:
    """Remove what an earlier run left in `folder` (its adapter, checkpoints, metrics and plot), after
    `check_replaceable` found only a run's work there, and record the entries this run writes."""
    check_replaceable(folder)
    for name in previous_run(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    # a plain write (no fsync, which costs ~20 ms, all of it in the run's training clock): a record lost or torn
    # by a crash reads as none, so a later overwrite refuses, never removes more. A new file at the name, never
    # written into an old one ("x"): a hard link's other name keeps its contents
    record = {"written_by": "deltatune", "entries": list(RUN_ENTRIES)}
    try:
        (folder / RUN_RECORD).unlink(missing_ok=True)
        with open(folder / RUN_RECORD, "x", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
    except OSError as error:
        raise OutputFolderError(
            f"cannot write {folder / RUN_RECORD} ({error.strerror or error}); give an output_dir you can write to"
        ) from None


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
