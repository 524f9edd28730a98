"""ClassLabel columns of `datasets`, read by their names.

`datasets` stores a `ClassLabel` column (and a list of them a row, `Sequence(ClassLabel)`: token-cls tags) as
integer ids, and keeps the names in its features: a saved folder's `dataset_info.json`, the `huggingface`
metadata of the Arrow and parquet schemas it writes, a `Dataset`'s `.features`. An id alone is no label: two
folders may list the same classes in other orders (`class_encode_column` sorts them, a hand-written list need
not), so a record holds the name, `names[id]`, as a JSON Lines or CSV file of the same rows would. The id -1 is
`datasets`' "no label" (a test split's): it is read as a null, refused where the task reads the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .data import DataError, Record

NO_LABEL = -1
"""The id `datasets` gives a row without a label."""

SCHEMA_METADATA_KEY = b"huggingface"
"""The key of an Arrow / parquet schema's metadata under which `datasets` writes its features (as JSON)."""


@dataclass(frozen=True)
class ClassLabelColumn:
    """A column of class ids: its class names (id i is `names[i]`), and whether a row holds a list of ids."""

    names: tuple[str, ...]
    listed: bool


def _one_label(feature: Mapping[str, Any]) -> ClassLabelColumn:
    return ClassLabelColumn(tuple(feature["names"]), listed=False)


def _list_of_labels(feature: Mapping[str, Any]) -> ClassLabelColumn | None:
    item = feature.get("feature")
    if isinstance(item, Mapping) and item.get("_type") == "ClassLabel":
        return ClassLabelColumn(tuple(item["names"]), listed=True)
    return None


COLUMN_KINDS: dict[str, Callable[[Mapping[str, Any]], ClassLabelColumn | None]] = {
    "ClassLabel": _one_label,
    "List": _list_of_labels,
    "LargeList": _list_of_labels,
    "Sequence": _list_of_labels,
}
"""A feature's `_type` (its JSON form, as `Features.to_dict()` and the schema metadata write it) → the class
label column it is, if any (a list type holds one when its item is a ClassLabel; `Sequence` is the older
`datasets`' name of `List`)."""


def class_label_columns(features: Mapping[str, Any]) -> dict[str, ClassLabelColumn]:
    """The ClassLabel columns among `features` (the JSON form of `datasets.Features`), by column name."""
    columns = {}
    for name, feature in features.items():
        kind = COLUMN_KINDS.get(feature.get("_type")) if isinstance(feature, Mapping) else None
        column = kind(feature) if kind is not None else None
        if column is not None:
            columns[name] = column
    return columns


def schema_features(schema: Any, where: str) -> dict[str, Any]:
    """The `datasets` features in a pyarrow schema's metadata (JSON form); none when another tool wrote it."""
    metadata = schema.metadata or {}
    if SCHEMA_METADATA_KEY not in metadata:
        return {}
    try:
        return json.loads(metadata[SCHEMA_METADATA_KEY]).get("info", {}).get("features", {})
    except (json.JSONDecodeError, AttributeError):
        raise DataError(
            f"{where}: the datasets metadata of its schema is not the JSON datasets writes; write the file again "
            "with datasets"
        ) from None


def source_features(source: Any) -> dict[str, Any]:
    """The features (JSON form) of a `datasets.Dataset` given from Python; none for another iterable."""
    to_dict = getattr(getattr(source, "features", None), "to_dict", None)
    return to_dict() if callable(to_dict) else {}


def with_class_names(records: list[Record], columns: Mapping[str, ClassLabelColumn]) -> list[Record]:
    """`records` with the ids in each of `columns` replaced by their class names."""
    if not columns:
        return records
    return [Record(_named_fields(record, columns), record.where) for record in records]


def _named_fields(record: Record, columns: Mapping[str, ClassLabelColumn]) -> dict[str, Any]:
    fields = dict(record.fields)
    for name, column in columns.items():
        value = fields.get(name)
        if value is None:
            continue
        if column.listed:
            fields[name] = [_class_name(record, name, column, item) for item in value]
        else:
            fields[name] = _class_name(record, name, column, value)
    return fields


def _class_name(record: Record, field: str, column: ClassLabelColumn, class_id: int | None) -> str | None:
    """The name of `class_id`; None for no label (-1, or a null)."""
    if class_id is None or class_id == NO_LABEL:
        return None
    if not 0 <= class_id < len(column.names):
        raise DataError(
            f"{record.where}: field {field!r} holds the class id {class_id}, but its ClassLabel names "
            f"{len(column.names)} classes {list(column.names)}; give each row an id of a named class"
        )
    return column.names[class_id]
