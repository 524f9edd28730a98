"""The one rule for adapter names, checked wherever a name enters deltatune.

A name is used as a folder (a save of several adapters writes `root/<name>/`) and as a key of the
`nn.ModuleDict` that holds a module's adapters. So a valid name is a single safe path component that
torch also takes as a key: non-empty; no '.' (it separates module paths, and it rules out '.', '..'
and hidden names), no '/', '\\' or ':' (a path or, on Windows, a drive), no control characters (NUL,
newline, ...); at most `MAX_BYTES` bytes of UTF-8, which leaves room within the 255-byte limit of common
file systems for the names a save stages under; and not an attribute of torch modules (`training`,
`forward`, `keys`, ...). Fusion names such as "a,b" are valid. Names enter through `DeltaModel.add`,
`deltatune.load` (the name given, folder names, and the "name" recorded in adapter files) and `save`.
"""

from __future__ import annotations

import unicodedata

from torch import nn

from .errors import AdapterNameError

MAX_BYTES = 200
FORBIDDEN_CHARACTERS = "./\\:"
RESERVED = frozenset(dir(nn.ModuleDict()))
RULE = (
    f"names are non-empty, without '.', '/', '\\', ':' or control characters, at most {MAX_BYTES} bytes of "
    "UTF-8, and not an attribute of torch modules ('training', 'forward', 'keys', ...)"
)


def name_problem(name: object) -> str | None:
    """What is wrong with `name` as an adapter name, or None if it is valid."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    bad = next(
        (
            character
            for character in name
            if character in FORBIDDEN_CHARACTERS or unicodedata.category(character) == "Cc"
        ),
        None,
    )
    if bad is not None:
        return f"contains {bad!r}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > MAX_BYTES:
        return f"is {size} bytes long"
    if name in RESERVED:
        return "is an attribute of torch modules"
    return None


def check_name(name: object, source: str = "", error: type[Exception] = AdapterNameError) -> str:
    """`name` if it follows the rule; else `error` (with `source`, e.g. the file the name came from)."""
    problem = name_problem(name)
    if problem is not None:
        where = f"{source}: " if source else ""
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:50] + "..."
        raise error(f"{where}adapter name {shown} {problem}: {RULE}; pick another name")
    return name
