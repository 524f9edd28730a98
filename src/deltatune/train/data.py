"""Reading training data: JSON Lines, CSV/TSV, parquet and Arrow files, text files of columns split
at a separator (`.txt`), folders saved by `datasets`' `save_to_disk`, or any iterable of dicts (a
`datasets.Dataset`) from Python.

A CSV file is quoted as Excel and Python's `csv` write it: a cell holding a comma, a quote or a line
end is quoted whole, each quote inside it doubled; malformed quoting (text after a closing quote, a
quote never closed) is refused naming the line, never read as other cells. A TSV file has no quoting,
as GLUE's files and their readers have none: every line is one record, split at every tab, and each
character is taken as it is (a `"` is part of the text).

A `.txt` file holds a record a line, its columns split at every occurrence of `separator` (E2E NLG's
`meaning representation||reference`: `separator: "||"`), with no quoting: a line must hold exactly
one value per column, and each value loses its surrounding spaces. Its columns are named as a CSV's
are: by its first line, or by `column_names` with `header: false`. Blank lines are skipped.

Parquet and Arrow files are read with pyarrow and saved folders with `datasets` (which brings
pyarrow): `pip install 'deltatune[data]'`; without them such a path is refused in one line naming
the extra. An Arrow file is the IPC stream that `datasets` writes (its cache files, the shards of a
saved folder) or the IPC file format (Feather v2). A `ClassLabel` column of `datasets` (a saved folder, the
Arrow and parquet files it writes, a `Dataset` from Python) is read by its class names, not its ids
(`data_class_labels`).

A field has one value: a header, `column_names`, a JSON object or an Arrow table that names a column
twice is refused, as are `columns` that would put two values under one name (a rename onto a field the
record keeps under its name, two renames onto one name), since a reader would keep one of them,
chosen by column order. A rename onto a name that is itself renamed away (`{label_text: label, label:
label_id}`) keeps both.

Every record (`data_record.Record`) keeps where it came from (`train.jsonl line 12`, `train.parquet row 0`: rows counted
from 0, as `dataset[i]`), so that an error about a malformed record names the file, the line and the
field. Fields each task reads (see `encode`):

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
import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_record import DataError, Record

TEXT_ENCODING = "utf-8-sig"
"""How JSON Lines, CSV/TSV and `.txt` files are read: UTF-8, a leading byte-order mark (Notepad's "UTF-8 with
BOM", Excel's "CSV UTF-8") dropped, so that it is no part of the first value or column name."""


ONE_NAME_EACH = "give each its own name (only one of the values would be read)"


def _first_repeat(names: Iterable[str]) -> str | None:
    """The first name given twice, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


class _RepeatedName(ValueError):
    """A JSON object names a field twice (its args: the name)."""


def _object_naming_each_field_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refused (`_RepeatedName`) where it names a field twice: `json` would keep
    the last value and drop the other without a word."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        raise _RepeatedName(_first_repeat(name for name, _ in pairs))
    return fields


def _check_columns_once_each(names: Iterable[str], named_by: str) -> None:
    """Refuse column names that repeat a name (`named_by`: who named them, for the message)."""
    repeated = _first_repeat(names)
    if repeated is not None:
        raise DataError(f"{named_by} names the column {repeated!r} twice; {ONE_NAME_EACH}")


def _read_jsonl(path: Path, layout: TableLayout) -> list[Record]:
    records = []
    with path.open(encoding=TEXT_ENCODING) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                fields = json.loads(line, object_pairs_hook=_object_naming_each_field_once)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON object"
                ) from None
            except _RepeatedName as repeated:
                raise DataError(
                    f"{where}: a JSON object names the field {repeated.args[0]!r} twice; {ONE_NAME_EACH}"
                ) from None
            if not isinstance(fields, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(fields).__name__}")
            records.append(Record(fields, where))
    return records


@dataclass(frozen=True)
class TableLayout:
    """How a CSV/TSV or `.txt` file names its columns: by its first line (`header`), or by `column_names`
    when it has no header row; and what splits a `.txt` file's columns (`separator`). Other file types
    name their fields themselves."""

    header: bool = True
    column_names: tuple[str, ...] | None = None
    separator: str | None = None


CSV_QUOTING = (
    'a cell holding a comma, a quote or a line end must be quoted whole, each quote inside it doubled ("say ""hi""",1)'
)
"""How a CSV cell holds a comma, a quote or a line end: what the error about malformed quoting says."""


def _read_delimited(delimiter: str, quoting: int) -> Callable[[Path, TableLayout], list[Record]]:
    """A reader of files of cells split at `delimiter`: CSV with `csv.QUOTE_MINIMAL` (strict, so that
    malformed quoting is an error naming the line), TSV with `csv.QUOTE_NONE` (see the module docstring)."""

    def read(path: Path, layout: TableLayout) -> list[Record]:
        with path.open(encoding=TEXT_ENCODING, newline="") as file:
            names = None if layout.header else list(layout.column_names or ())
            reader = csv.DictReader(file, fieldnames=names, delimiter=delimiter, quoting=quoting, strict=True)
            try:
                return _delimited_records(path, reader, layout, names)
            except csv.Error as error:
                first, last = reader.line_num + 1, reader.reader.line_num  # the record after the last one read
                lines = f"line {first}" if first >= last else f"lines {first}-{last}"
                rule = "" if quoting == csv.QUOTE_NONE else f"; {CSV_QUOTING}"
                raise DataError(f"{path.name} {lines}: {error}{rule}") from None

    return read


def _delimited_records(
    path: Path, reader: csv.DictReader, layout: TableLayout, names: list[str] | None
) -> list[Record]:
    _check_column_names(path, list(reader.fieldnames or []), layout.header)
    named_by = f"the header {reader.fieldnames}" if layout.header else f"column_names {names}"
    records = []
    for row in reader:
        where = f"{path.name} line {reader.line_num}"
        if None in row or None in row.values():
            raise DataError(f"{where}: the row has a different number of columns than {named_by}")
        records.append(Record(dict(row), where))
    return records


def _read_separated(path: Path, layout: TableLayout) -> list[Record]:
    """A `.txt` file of columns split at `layout.separator` (see the module docstring)."""
    separator = layout.separator
    if separator is None:
        raise DataError(
            f"{path.name}: a .txt file is read as lines of columns split at a separator; set separator (e.g. "
            'separator: "||") and name the columns (header: false and column_names: [prompt, completion])'
        )
    with path.open(encoding=TEXT_ENCODING) as file:
        lines = [(number, line) for number, line in enumerate(file, start=1) if line.strip()]
    split = [(number, [value.strip() for value in line.split(separator)]) for number, line in lines]
    if layout.header and split:
        names, named_by = split.pop(0)[1], "the header"
    else:
        names, named_by = list(layout.column_names or ()), "column_names"
    _check_column_names(path, names, layout.header)
    records = []
    for number, values in split:
        if len(values) != len(names):
            raise DataError(
                f"{path.name} line {number}: {len(values)} value(s) split at {separator!r}, but {named_by} "
                f"{names} name {len(names)}; each line must hold one value per column, split at the separator"
            )
        records.append(Record(dict(zip(names, values)), f"{path.name} line {number}"))
    return records


def _check_column_names(path: Path, names: list[str], from_header: bool) -> None:
    """Refuse a header with a column named like a number (the first line was most likely a record), and
    names, from the header or `column_names`, that repeat a name (a reader keeps one of the columns)."""
    numeric = next((name for name in names if _is_number(name)), None) if from_header else None
    if numeric is not None:
        raise DataError(
            f"{path.name} line 1 was taken as the header, but its column {numeric!r} is named like a number, so "
            "the file likely has no header row: set header: false and column_names: [...] (a name per column)"
        )
    _check_columns_once_each(names, f"{path.name} line 1 (the header)" if from_header else f"{path.name}: column_names")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataError(f"{what} needs the {module} package: pip install 'deltatune[data]'")


def _rows(path: Path, rows: list[dict[str, Any]], features: dict[str, Any]) -> list[Record]:
    """The records of `rows`, their ClassLabel columns (by `datasets`' `features`) read as class names."""
    from .data_class_labels import class_label_columns, with_class_names

    records = [Record(fields, f"{path.name} row {index}") for index, fields in enumerate(rows)]
    return with_class_names(records, class_label_columns(features))


def _table_rows(path: Path, table: Any) -> list[Record]:
    """The records of a pyarrow table, refused where it names a column twice (its rows as dicts would
    keep the last); the features `datasets` wrote into its schema name its ClassLabel ids."""
    from .data_class_labels import schema_features

    _check_columns_once_each(table.schema.names, f"{path.name}: the table")
    return _rows(path, table.to_pylist(), schema_features(table.schema, path.name))


def _read_parquet(path: Path, layout: TableLayout) -> list[Record]:
    _require("pyarrow", f"{path}: reading a parquet file")
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        _check_columns_once_each(parquet.schema_arrow.names, f"{path.name}: the table")
        table = parquet.read()
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    return _table_rows(path, table)


def _read_arrow(path: Path, layout: TableLayout) -> list[Record]:
    _require("pyarrow", f"{path}: reading an Arrow file")
    import pyarrow
    import pyarrow.ipc

    for open_reader in (pyarrow.ipc.open_stream, pyarrow.ipc.open_file):
        try:
            with pyarrow.memory_map(str(path)) as source:
                return _table_rows(path, open_reader(source).read_all())
        except pyarrow.ArrowInvalid:
            continue
    raise DataError(f"{path}: not an Arrow IPC stream or file; write it with datasets or pyarrow.ipc")


def _read_saved_dataset(path: Path, layout: TableLayout) -> list[Record]:
    """A folder written by `Dataset.save_to_disk` (one split; a `DatasetDict` folder names its splits)."""
    _require("datasets", f"{path}: reading a folder saved by datasets")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is a folder but not one saved by datasets' save_to_disk; give a data file or such a folder"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        raise DataError(
            f"{path} holds the splits {', '.join(splits)}; give one split's folder, e.g. {path / splits[0]}"
        )
    return _rows(path, dataset.to_list(), dataset.features.to_dict())


READERS: dict[str, Callable[[Path, TableLayout], list[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".csv": _read_delimited(",", csv.QUOTE_MINIMAL),
    ".tsv": _read_delimited("\t", csv.QUOTE_NONE),
    ".txt": _read_separated,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}
"""File suffix → reader of (path, layout); the layout matters to CSV/TSV and `.txt` files only."""


def read_records(
    source: str | Path | Iterable[dict[str, Any]],
    columns: dict[str, str] | None = None,
    layout: TableLayout = TableLayout(),
) -> list[Record]:
    """Records from a file path (by its suffix), a folder saved by `datasets`, or any iterable of dicts
    (a `datasets.Dataset`). `columns` renames fields, {name in the data: name the task reads} (GLUE's
    `sentence` → `text`); `layout`: how a CSV/TSV or `.txt` file names (and splits) its columns."""
    _check_renames_distinct(columns or {})
    records = _read(source, layout)
    if not columns:
        return records
    return [_renamed(record, columns) for record in records]


def _check_renames_distinct(columns: dict[str, str]) -> None:
    """Refuse `columns` that rename two fields onto one name: one of their values would be lost."""
    sources_of: dict[str, str] = {}
    for source, target in columns.items():
        if target in sources_of:
            raise DataError(
                f"columns renames both {sources_of[target]!r} and {source!r} to {target!r}; rename each to a name "
                "of its own (only one of the values would be read)"
            )
        sources_of[target] = source


def _renamed(record: Record, columns: dict[str, str]) -> Record:
    """`record` with its fields renamed by `columns`; a rename onto a field that the record already has
    and that keeps its name is refused, since one of the two values would be lost, chosen by column order."""
    for source, target in columns.items():
        if source in record.fields and target in record.fields and target not in columns:
            raise DataError(
                f"{record.where}: columns renames {source!r} to {target!r}, but the record already has a field "
                f"{target!r}; rename that one too (columns: {{{source}: {target}, {target}: another_name}}) or "
                f"rename {source!r} to another name"
            )
    return Record({columns.get(key, key): value for key, value in record.fields.items()}, record.where)


def _read(source: str | Path | Iterable[dict[str, Any]], layout: TableLayout) -> list[Record]:
    if not isinstance(source, (str, Path)):
        from .data_class_labels import class_label_columns, source_features, with_class_names

        records = [_python_record(fields, f"record {index}") for index, fields in enumerate(source)]
        return with_class_names(records, class_label_columns(source_features(source)))
    path = Path(source)
    reader = _read_saved_dataset if path.is_dir() else READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(READERS)}, or a folder "
            "saved by datasets' save_to_disk"
        )
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path (relative paths start at the current folder)")
    try:
        records = reader(path, layout)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _python_record(fields: Any, where: str) -> Record:
    """A record from Python: a mapping of field names (a mapping names each field once)."""
    if not isinstance(fields, Mapping):
        raise DataError(f"{where}: expected a dict of fields, got {type(fields).__name__}; give one dict per record")
    return Record(dict(fields), where)


def subsample(records: list[Record], count: int | None, seed: int) -> list[Record]:
    """`count` of `records` drawn at random with `seed`, kept in their order (a file sorted by label
    still gives every label); all of them when `count` is None or not below their number."""
    if count is None or count >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[index] for index in chosen]
