"""Where commands write: never into their inputs, never over earlier work unless told to, never half.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from ..errors import OutputFolderError


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
            raise OutputFolderError(f"merge never writes into its inputs: OUT {out} {relation} the {role} folder {folder}; give a new folder for the merged model")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"OUT {out} is a file; give a folder for the merged model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(f"OUT {out} already exists and is not empty; pass --overwrite to replace it, or give a new folder")


@contextlib.contextmanager
def replaced_folder(out: Path) -> Iterator[Path]:
    """A staging folder beside `out` to write into; when the block ends without error it takes the
    place of `out` (an old `out` is removed), else it is removed and `out` stays as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise OutputFolderError(f"cannot write beside {out} ({error.strerror or error}); give a folder you can write to") from None
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
