"""What each config field means, read from the code: the docstring under the field.

A config dataclass documents a field with a string literal on the line under it (`r: PositiveInt = 8`,
then the string), which Python keeps nowhere at run time; this reads it from the class source
(each class in the method resolution order, so inherited fields keep their documents). With the
annotation in words (`deltatune.field_check.describe`) and the default, it is what `deltatune methods
NAME` prints for every field of a method's config.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
from typing import Any

from .field_check import describe, field_types


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One config field: its name, what it accepts in words, its default as YAML writes it, its document."""

    name: str
    accepts: str
    default: str
    doc: str


def field_docs(config_class: type) -> list[FieldDoc]:
    """Every field of dataclass `config_class`, in declaration order (inherited fields first)."""
    docs: dict[str, str] = {}
    for owner in reversed(config_class.__mro__):
        docs.update(_docstrings_under_fields(owner))
    types = field_types(config_class)
    return [
        FieldDoc(field.name, describe(types[field.name]), _default_text(field), docs.get(field.name, ""))
        for field in dataclasses.fields(config_class)
    ]


@functools.cache
def _docstrings_under_fields(owner: type) -> dict[str, str]:
    """{field name: the string literal right after its annotated assignment} in `owner`'s own source."""
    try:
        source = textwrap.dedent(inspect.getsource(owner))
    except (OSError, TypeError):  # a built-in, or a class without a source file
        return {}
    (node,) = ast.parse(source).body
    if not isinstance(node, ast.ClassDef):
        return {}
    found = {}
    for statement, following in zip(node.body, node.body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


def _default_text(field: dataclasses.Field) -> str:
    """The default as a config file would spell it (JSON, which YAML reads: null, true, [a, b])."""
    if field.default is not dataclasses.MISSING:
        value: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return json.dumps(value, default=str)
