"""Config fields as the command line shows them: `deltatune methods NAME` prints a method's fields
with what each accepts, its default and its document; `deltatune train --help` ends by naming every
training config key and where each is documented. Both read the docstrings under the fields
(`deltatune.field_docs`), so the help cannot drift from the code."""

from __future__ import annotations

import inspect
import textwrap

from ..field_docs import FieldDoc, field_docs
from ..registry import get_method

WIDTH = 100
"""Columns of the printed help."""


def method_help(name: str) -> str:
    """Every field of method `name`'s config: `name: accepts (default D)`, then its document."""
    config_class = get_method(name).config_class
    summary = (inspect.getdoc(config_class) or "").partition("\n")[0]
    lines = [f"{name} ({config_class.__name__}){': ' + summary if summary else ''}"]
    lines.append("Fields, set under `adapter:` in a training config (or adapter.FIELD=VALUE on the command line):")
    for field in field_docs(config_class):
        lines += ["", *_field_lines(field)]
    return "\n".join(lines)


def _field_lines(field: FieldDoc) -> list[str]:
    head = f"  {field.name}: {field.accepts} (default {field.default})"
    body = [textwrap.indent(line, "      ") for line in field.doc.splitlines()] or ["      (undocumented)"]
    return [head, *body]


def train_epilog() -> str:
    """The end of `deltatune train --help`: the training config keys, and where they are documented."""
    from .config import TrainConfig

    keys = ", ".join(field.name for field in field_docs(TrainConfig))
    where = inspect.getsourcefile(TrainConfig)
    return "\n".join(
        [
            f"config keys (each documented under its field of TrainConfig in {where}):",
            textwrap.fill(keys, WIDTH, initial_indent="  ", subsequent_indent="  "),
            "the keys under `adapter:` are the method's: `deltatune methods NAME` prints them with their",
            "documents and defaults (`deltatune methods` lists the methods).",
        ]
    )
