"""Where one adapter is expected (`deltatune merge`, `export`, `export --merged`, `eval --adapter`), a folder
of several is refused before any model loads. Such a folder is what `DeltaModel.save` writes for a model of
several adapters, one subfolder each; loading it activates the first only, so a merge or an evaluation of it
would use that one alone and say nothing of the others."""

from __future__ import annotations

from pathlib import Path

from .errors import DeltaTuneError
from .io import adapter_folders


def single_adapter_folder(folder: str | Path) -> Path:
    """The folder holding the one adapter of `folder` (itself, or its one adapter subfolder); a folder of
    several is refused, naming them and a subfolder to give instead."""
    found = adapter_folders(Path(folder), None)
    if len(found) > 1:
        names = ", ".join(str(name) for name, _ in found)
        raise DeltaTuneError(
            f"{folder} holds {len(found)} adapters ({names}), where one adapter is expected: give one subfolder, "
            f"e.g. {found[0][1]}"
        )
    return found[0][1]
