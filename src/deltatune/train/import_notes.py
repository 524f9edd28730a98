"""Quiet the optional packages' import notes that say nothing to a `deltatune` user.

transformers imports torchao whenever it is installed, and torchao's import then logs a warning for each
compiled extension its wheel ships for another Python or a GPU ("Failed to load .../_C_mxfp8...so"; torchao
falls back to its Python kernels, which is what runs on a CPU anyway), and torch logs a deprecation note for
each Enum torchao registers with pytree. A run that never asked for torchao starts with a screen of them.

`quiet_import_notes` (called by the command, never by the library: a program that imports deltatune keeps
its logging as it set it) drops exactly those records by their logger and message template, and nothing
else those loggers say.
"""

from __future__ import annotations

import logging

IMPORT_NOTES: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",),
}
"""Logger name → the message templates (`record.msg`, before formatting) of its notes to drop."""


class _ImportNoteFilter(logging.Filter):
    """Drops the records whose template starts with one of `templates`."""

    def __init__(self, templates: tuple[str, ...]) -> None:
        super().__init__()
        self.templates = templates

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.templates))


def quiet_import_notes() -> None:
    """Install the filters of `IMPORT_NOTES` (once per logger, however often it is called)."""
    for name, templates in IMPORT_NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _ImportNoteFilter) for existing in logger.filters):
            logger.addFilter(_ImportNoteFilter(templates))
