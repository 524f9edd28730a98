"""What the save tests look for after a save: the staging and aside entries it must not leave."""

from __future__ import annotations

from pathlib import Path


def leftovers(folder: Path) -> list[str]:
    """Staging and aside folders of saves, beside the folder or in it."""
    places = [folder.parent] + ([folder] if folder.is_dir() else [])
    return sorted(
        entry.name
        for place in places
        for entry in place.iterdir()
        if entry.name.endswith((".partial", ".deltatune-old"))
    )
