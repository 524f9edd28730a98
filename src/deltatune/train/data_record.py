"""One record of training data: its fields, where it came from, and access to a field checked to be of
its kind, with an error naming the record (`DataError`) otherwise. `data` reads files into records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DeltaTuneError


class DataError(DeltaTuneError):
    """A data file that is missing, unreadable, or holds a malformed record."""


@dataclass(frozen=True)
class Record:
    """One example: its fields, and where it came from (for error messages)."""

    fields: dict[str, Any]
    where: str

    def get(self, field: str, kind: type | tuple[type, ...] = str, hint: str = "") -> Any:
        """The value of `field`, checked to be of `kind`; a clear error naming the record otherwise
        (a null is no value: refused as a missing field is)."""
        if field not in self.fields:
            raise DataError(f"{self.where}: field {field!r} is missing{hint}; the record has {sorted(self.fields)}")
        value = self.fields[field]
        if value is None:
            raise DataError(f"{self.where}: field {field!r} is null{hint}; give it a value")
        if not isinstance(value, kind):
            raise DataError(f"{self.where}: field {field!r} must be {_kind_names(kind)}, got {_shown(value)}")
        return value

    def get_items(self, field: str, kind: type | tuple[type, ...] = str) -> list[Any]:
        """The list in `field`, each item checked to be of `kind`: a null item (a word or tag
        without a value) is refused naming its position, never read as the text 'None'."""
        items = self.get(field, list)
        for position, item in enumerate(items):
            if item is None:
                raise DataError(
                    f"{self.where}: field {field!r} holds a null at position {position}; give every item a value"
                )
            if not isinstance(item, kind):
                raise DataError(
                    f"{self.where}: field {field!r} must hold {_kind_names(kind)} items, got {_shown(item)} at "
                    f"position {position}"
                )
        return items


def _kind_names(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
