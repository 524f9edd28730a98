"""The options of an AdapterHub config part that deltatune reads at one value only: others are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import AdapterFileError


def refuse_other_options(options: dict[str, Any], fixed: dict[str, Any], folder: Path, part: str) -> None:
    """Raise, naming the option, where `options` sets one of `fixed` otherwise (`leave_out`: None is [])."""
    for option, value in fixed.items():
        given = options.get(option, value)
        if (list(given or []) if option == "leave_out" else given) != value:
            raise AdapterFileError(
                f"{folder}: AdapterHub {part} option {option}={given!r} is not supported (deltatune reads "
                f"{option}={value!r})"
            )
