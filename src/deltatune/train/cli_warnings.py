"""How the command line shows warnings: deltatune's own as one line, `deltatune: warning: MESSAGE`.

Python shows a warning as `path/to/file.py:167: CutInputsWarning: MESSAGE` followed by the source line
that raised it, which tells a command-line user where in deltatune the notice was made, not what to do.
While a command runs, a warning whose class is deltatune's (`deltatune.errors`) or that deltatune's code
raised is shown as one line in the same form as the command's errors; other libraries' warnings keep
Python's form, whose file and line say where they come from. Only the display changes: filters, and
code that records warnings (`warnings.catch_warnings(record=True)`, pytest), see them as before.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
"""The deltatune package's folder: warnings raised from files under it are deltatune's."""


def is_deltatune_warning(category: type[Warning], filename: str) -> bool:
    return category.__module__.split(".")[0] == "deltatune" or Path(filename).resolve().is_relative_to(PACKAGE)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within: deltatune's warnings are shown as `deltatune: warning: MESSAGE`."""
    original = warnings.formatwarning

    def formatted(message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None) -> str:
        if is_deltatune_warning(category, filename):
            return f"deltatune: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = original
