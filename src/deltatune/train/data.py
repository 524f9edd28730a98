"""Reading training data: JSON Lines, CSV/TSV files, or Hugging Face `datasets` objects.

Every record keeps where it came from (`train.jsonl line 12`), so that an error about a malformed
record names the file, the line and the field. Fields each task reads (see `encode`):

| task               | fields                                                          |
|--------------------|-----------------------------------------------------------------|
| causal-lm          | `prompt` + `completion`, or `messages` (chat; the last is the assistant's answer) |
| seq2seq-lm         | `prompt` + `completion`                                         |
| seq-cls            | `text` (+ `text_pair`) + `label`                                |
| token-cls          | `tokens` (list of words) + `tags` (one per word)                |
| qa                 | `question` + `context` + `answer` (+ `answer_start`)            |
| feature-extraction | `text` + `positive`                                             |
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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
        """The value of `field`, checked to be of `kind`; a clear error naming the record otherwise."""
        if field not in self.fields or self.fields[field] is None:
            raise DataError(f"{self.where}: field {field!r} is missing{hint}; the record has {sorted(self.fields)}")
        value = self.fields[field]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataError(f"{self.where}: field {field!r} must be {names}, got {type(value).__name__} {value!r}")
        return value


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON object"
                ) from None
            if not isinstance(fields, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(fields).__name__}")
            records.append(Record(fields, where))
    return records


def _read_delimited(delimiter: str) -> Callable[[Path], list[Record]]:
    def read(path: Path) -> list[Record]:
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file, delimiter=delimiter)
            records = []
            for row in reader:
                where = f"{path.name} line {reader.line_num}"
                if None in row or None in row.values():
                    raise DataError(
                        f"{where}: the row has a different number of columns than the header {reader.fieldnames}"
                    )
                records.append(Record(dict(row), where))
        return records

    return read


READERS: dict[str, Callable[[Path], list[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".csv": _read_delimited(","),
    ".tsv": _read_delimited("\t"),
}


def read_records(source: str | Path | Iterable[dict[str, Any]], columns: dict[str, str] | None = None) -> list[Record]:
    """Records from a file path (by its suffix) or from any iterable of dicts (a `datasets.Dataset`).
    `columns` renames fields, {name in the data: name the task reads} (GLUE's `sentence` → `text`)."""
    records = _read(source)
    if not columns:
        return records
    return [
        Record({columns.get(key, key): value for key, value in record.fields.items()}, record.where)
        for record in records
    ]


def _read(source: str | Path | Iterable[dict[str, Any]]) -> list[Record]:
    if not isinstance(source, (str, Path)):
        return [Record(dict(fields), f"record {index}") for index, fields in enumerate(source)]
    path = Path(source)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(READERS)}")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path (relative paths start at the current folder)")
    try:
        records = reader(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records
