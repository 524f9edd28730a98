"""Config fields checked against their annotations: one rule for every config dataclass.

A config field's annotation says what it accepts, and `check_fields` holds every field of a dataclass
to it: `int`, `float`, `bool`, `str`, `None`, unions (`X | None`), `list[X]`, `dict[K, V]`,
`Iterable[X]`, `Literal[...]`, `Any` and plain classes. Numbers are strict: a bool is never a number
(`True` is not a batch size), an int is a float, and a float must be finite. Ranges and other limits
ride on the type with `typing.Annotated`, next to the field they limit:

    r: PositiveInt = 8                              # a whole number ≥ 1
    lora_dropout: DropoutRate = 0.0                 # a number in [0, 1)
    rank_pattern: dict[Regex, PositiveInt] = ...    # limits apply inside containers too

A refused value gets one line that names the field, says what it accepts (worded from the annotation)
and shows what was given: `max_steps must be a whole number ≥ 1 or null, got -5`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from .errors import DeltaTuneError


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds on a number: `minimum`/`maximum` are allowed, `above`/`below` are not."""

    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    below: float | None = None

    def allows(self, number: float) -> bool:
        return (
            (self.minimum is None or number >= self.minimum)
            and (self.above is None or number > self.above)
            and (self.maximum is None or number <= self.maximum)
            and (self.below is None or number < self.below)
        )

    def describe(self, base: str) -> str:
        """`base` with the bounds: "a whole number ≥ 1", "a number in [0, 1)"."""
        lower, upper = _first_set(self.minimum, self.above), _first_set(self.maximum, self.below)
        if lower is not None and upper is not None:
            opening, closing = "[" if self.minimum is not None else "(", "]" if self.maximum is not None else ")"
            return f"{base} in {opening}{_number_text(lower)}, {_number_text(upper)}{closing}"
        if lower is not None:
            return f"{base} {'≥' if self.minimum is not None else '>'} {_number_text(lower)}"
        if upper is not None:
            return f"{base} {'≤' if self.maximum is not None else '<'} {_number_text(upper)}"
        return base


def _first_set(*bounds: float | None) -> float | None:
    return next((bound for bound in bounds if bound is not None), None)


def _number_text(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


class RegularExpression:
    """A string that compiles with `re`."""

    def allows(self, text: str) -> bool:
        try:
            re.compile(text)
        except (re.error, RecursionError, OverflowError):
            return False
        return True

    def describe(self, base: str) -> str:
        return "regular expressions" if base == "strings" else "a regular expression"


@dataclasses.dataclass(frozen=True)
class FullMatch:
    """A string that the regular expression `pattern` matches whole; `shown` is how a message names it."""

    pattern: str
    shown: str

    def allows(self, text: str) -> bool:
        return re.fullmatch(self.pattern, text) is not None

    def describe(self, base: str) -> str:
        return self.shown


PositiveInt = Annotated[int, Range(minimum=1)]
NonNegativeInt = Annotated[int, Range(minimum=0)]
PositiveFloat = Annotated[float, Range(above=0)]
NonNegativeFloat = Annotated[float, Range(minimum=0)]
DropoutRate = Annotated[float, Range(minimum=0, below=1)]
Regex = Annotated[str, RegularExpression()]


def check_fields(config: Any, error: type[DeltaTuneError] = DeltaTuneError) -> None:
    """Raise `error` for the first field of the dataclass instance `config` whose value its annotation
    does not accept."""
    for name, annotation in field_types(type(config)).items():
        value = getattr(config, name)
        if not accepts(annotation, value):
            raise error(f"{name} must be {describe(annotation)}, got {_shown(value)}")


def mapping_problem(data: Any, annotations: dict[str, Any], required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `data`, a mapping read from a file whose keys `annotations` types (others are left
    alone), in a phrase: not a mapping, a `required` key missing, or the first key whose value its
    annotation does not accept; None when nothing is."""
    if not isinstance(data, dict):
        return f"it must be a mapping, got {_shown(data)}"
    missing = [key for key in required if key not in data]
    if missing:
        return f"it has no {missing[0]}"
    return next(
        (
            f"{key} must be {describe(annotation)}, got {_shown(data[key])}"
            for key, annotation in annotations.items()
            if key in data and not accepts(annotation, data[key])
        ),
        None,
    )


def numbers_from_text(config_class: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with numbers written as text read as numbers, for the fields that take a number and no
    text: YAML reads `1e-4` (no dot) as a string. Text that is no number is left for the check to refuse."""
    types_by_name = field_types(config_class)
    converted = dict(data)
    for key, value in data.items():
        if isinstance(value, str) and key in types_by_name and _takes_number_not_text(types_by_name[key]):
            try:
                converted[key] = float(value)
            except ValueError:
                pass
    return converted


@functools.cache
def field_types(config_class: type) -> dict[str, Any]:
    """{field name: resolved annotation}. An annotation that cannot be resolved (it names something
    local to a function) is `Any`: that field is not checked, the others are."""
    try:
        hints = typing.get_type_hints(config_class, include_extras=True)
    except (NameError, TypeError, AttributeError):
        hints = {field.name: _resolved_alone(config_class, field) for field in dataclasses.fields(config_class)}
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(config_class)}


def _resolved_alone(config_class: type, field: dataclasses.Field) -> Any:
    if not isinstance(field.type, str):
        return field.type
    owner = next(
        (base for base in config_class.__mro__ if field.name in vars(base).get("__annotations__", {})), config_class
    )
    try:
        return eval(field.type, vars(sys.modules[owner.__module__]), dict(vars(owner)))  # noqa: S307 - as typing does
    except Exception:  # noqa: BLE001 - whatever stops the resolution, the field stays unchecked
        return Any


# ----------------------------------------------------------------------------- accepting
def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_integer(value) or (isinstance(value, float) and math.isfinite(value))


PLAIN_CHECKS: dict[Any, Callable[[Any], bool]] = {
    int: _is_integer,
    float: _is_number,
    bool: lambda value: isinstance(value, bool),
    type(None): lambda value: value is None,
    Any: lambda value: True,
}
"""Types whose check is not `isinstance`."""

LIST_TYPES = (list, tuple, set, frozenset)
"""What a `list[X]` field takes from Python (a config keeps a list)."""


def _accepts_union(arguments: tuple, value: Any) -> bool:
    return any(accepts(argument, value) for argument in arguments)


def _accepts_annotated(arguments: tuple, value: Any) -> bool:
    base, *limits = arguments
    return accepts(base, value) and all(limit.allows(value) for limit in limits)


def _accepts_list(arguments: tuple, value: Any) -> bool:
    return isinstance(value, LIST_TYPES) and all(accepts(arguments[0] if arguments else Any, item) for item in value)


def _accepts_dict(arguments: tuple, value: Any) -> bool:
    key_type, value_type = arguments or (Any, Any)
    return isinstance(value, dict) and all(
        accepts(key_type, key) and accepts(value_type, item) for key, item in value.items()
    )


def _accepts_iterable(arguments: tuple, value: Any) -> bool:
    """Built-in containers are checked item by item; other iterables (a `datasets.Dataset`, a
    generator) are taken as they are: checking them would read or consume them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable):
        return False
    return not isinstance(value, (*LIST_TYPES, dict)) or all(
        accepts(arguments[0] if arguments else Any, item) for item in value
    )


def _accepts_literal(arguments: tuple, value: Any) -> bool:
    return any(type(value) is type(option) and value == option for option in arguments)


COMPOUND_CHECKS: dict[Any, Callable[[tuple, Any], bool]] = {
    typing.Union: _accepts_union,
    types.UnionType: _accepts_union,
    Annotated: _accepts_annotated,
    list: _accepts_list,
    dict: _accepts_dict,
    collections.abc.Iterable: _accepts_iterable,
    Literal: _accepts_literal,
}
"""{`typing.get_origin` of an annotation: check of a value against the annotation's arguments}."""


def accepts(annotation: Any, value: Any) -> bool:
    """Whether `value` is of the type `annotation` describes (and within its limits)."""
    origin = _origin(annotation)
    if origin in COMPOUND_CHECKS:
        return COMPOUND_CHECKS[origin](_arguments(annotation), value)
    if annotation in PLAIN_CHECKS:
        return PLAIN_CHECKS[annotation](value)
    kind = origin or annotation
    return isinstance(value, kind) if isinstance(kind, type) else True


def _origin(annotation: Any) -> Any:
    if typing.get_origin(annotation) is Annotated:
        return Annotated
    return typing.get_origin(annotation) or (annotation if annotation in (list, dict) else None)


def _arguments(annotation: Any) -> tuple:
    if typing.get_origin(annotation) is Annotated:
        return (annotation.__origin__, *annotation.__metadata__)
    return typing.get_args(annotation)


# ----------------------------------------------------------------------------- describing
PLAIN_WORDS: dict[Any, tuple[list[str], str]] = {
    int: (["a whole number"], "whole numbers"),
    float: (["a number"], "numbers"),
    bool: (["true", "false"], "booleans"),
    str: (["a string"], "strings"),
    type(None): (["null"], "nulls"),
    Path: (["a path"], "paths"),
    Any: (["anything"], "values"),
}
"""{type: (the alternatives it offers, its plural)}, as a config file's author reads them."""


def _contained(annotation: Any) -> str:
    return " or ".join(_alternatives(annotation, plural=True))


def _describe_union(arguments: tuple, plural: bool) -> list[str]:
    return [text for argument in arguments for text in _alternatives(argument, plural)]


def _describe_annotated(arguments: tuple, plural: bool) -> list[str]:
    base, *limits = arguments
    texts = _alternatives(base, plural)
    for limit in limits:
        texts = [limit.describe(text) for text in texts]
    return texts


def _describe_list(arguments: tuple, plural: bool) -> list[str]:
    return ["lists" if plural else f"a list of {_contained(arguments[0] if arguments else Any)}"]


def _describe_dict(arguments: tuple, plural: bool) -> list[str]:
    if not arguments or arguments[1] is Any:
        return ["mappings" if plural else "a mapping"]
    return ["mappings" if plural else f"a mapping of {_contained(arguments[0])} to {_contained(arguments[1])}"]


def _describe_iterable(arguments: tuple, plural: bool) -> list[str]:
    return ["iterables" if plural else f"an iterable of {_contained(arguments[0] if arguments else Any)}"]


def _describe_literal(arguments: tuple, plural: bool) -> list[str]:
    return [json.dumps(option, ensure_ascii=False) for option in arguments]


COMPOUND_WORDS: dict[Any, Callable[[tuple, bool], list[str]]] = {
    typing.Union: _describe_union,
    types.UnionType: _describe_union,
    Annotated: _describe_annotated,
    list: _describe_list,
    dict: _describe_dict,
    collections.abc.Iterable: _describe_iterable,
    Literal: _describe_literal,
}


def _alternatives(annotation: Any, plural: bool = False) -> list[str]:
    origin = _origin(annotation)
    if origin in COMPOUND_WORDS:
        return COMPOUND_WORDS[origin](_arguments(annotation), plural)
    if annotation in PLAIN_WORDS:
        singular, plural_word = PLAIN_WORDS[annotation]
        return [plural_word] if plural else singular
    name = getattr(annotation, "__name__", str(annotation))
    return [f"{name} objects" if plural else f"a {name}"]


def describe(annotation: Any) -> str:
    """What `annotation` accepts, in words: `int | None` → "a whole number or null"."""
    texts = list(dict.fromkeys(_alternatives(annotation)))
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} or {texts[-1]}"


def _takes_number_not_text(annotation: Any) -> bool:
    leaves = _leaf_types(annotation)
    return float in leaves and str not in leaves and Any not in leaves


def _leaf_types(annotation: Any) -> set:
    """The plain types in a union (through `Annotated`)."""
    origin = _origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(argument) for argument in _arguments(annotation)))
    if origin is Annotated:
        return _leaf_types(_arguments(annotation)[0])
    return {annotation}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
