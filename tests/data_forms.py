"""The same rows in every form `read_records` takes: JSON Lines, CSV and TSV with and without a header,
`.txt` split at a separator with and without a header, parquet, Arrow (Feather file and IPC stream), a
folder saved by `datasets`, and a list of dicts from Python. A test of a rule about records runs it on
each form, so that the rule holds for every reader, not only for the one a bug was found in."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deltatune.train.data import TableLayout

Source = Path | list[dict[str, Any]]


def _jsonl(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, TableLayout()


def _delimited(suffix: str, delimiter: str, header: bool) -> Callable[[Path, list[dict]], tuple[Source, TableLayout]]:
    def write(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
        path = folder / f"rows{suffix}"
        with path.open("w", encoding="utf-8", newline="") as file:
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # a TSV has no quoting
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter, quoting=quoting)
            if header:
                writer.writeheader()
            writer.writerows(rows)
        return path, TableLayout() if header else TableLayout(header=False, column_names=tuple(rows[0]))

    return write


def _separated(header: bool) -> Callable[[Path, list[dict]], tuple[Source, TableLayout]]:
    def write(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
        path = folder / "rows.txt"
        lines = (["||".join(rows[0])] if header else []) + ["||".join(map(str, row.values())) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        names = None if header else tuple(rows[0])
        return path, TableLayout(header=header, column_names=names, separator="||")

    return write


def pyarrow_modules():
    """pyarrow with its parquet, feather and ipc modules; the test is skipped where it is not installed."""
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'deltatune[data]')")
    import pyarrow
    import pyarrow.feather
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


def write_table(form: str, folder: Path, table: Any) -> Path:
    """A pyarrow table written as a parquet file, an Arrow (Feather) file or an Arrow IPC stream."""
    pyarrow = pyarrow_modules()
    path = folder / ("rows.parquet" if form == "parquet" else "rows.arrow")
    if form == "parquet":
        pyarrow.parquet.write_table(table, path)
    elif form == "arrow file":
        pyarrow.feather.write_feather(table, str(path))
    else:
        with pyarrow.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
    return path


def _table(form: str) -> Callable[[Path, list[dict]], tuple[Source, TableLayout]]:
    def write(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
        return write_table(form, folder, pyarrow_modules().Table.from_pylist(rows)), TableLayout()

    return write


def _saved_folder(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'deltatune[data]')")
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
    return folder / "saved", TableLayout()


def _python(folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
    return [dict(row) for row in rows], TableLayout()


WRITERS: dict[str, Callable[[Path, list[dict]], tuple[Source, TableLayout]]] = {
    "jsonl": _jsonl,
    "csv": _delimited(".csv", ",", header=True),
    "csv without header": _delimited(".csv", ",", header=False),
    "tsv": _delimited(".tsv", "\t", header=True),
    "tsv without header": _delimited(".tsv", "\t", header=False),
    "txt": _separated(header=True),
    "txt without header": _separated(header=False),
    "parquet": _table("parquet"),
    "arrow file": _table("arrow file"),
    "arrow stream": _table("arrow stream"),
    "datasets folder": _saved_folder,
    "python dicts": _python,
}
"""Form → writer of (folder, rows) giving (the source to read, its layout). The text forms hold strings only."""

ALL_FORMS = list(WRITERS)
TABLE_FORMS = ["parquet", "arrow file", "arrow stream"]
TYPED_FORMS = ["jsonl", "parquet", "arrow file", "arrow stream", "datasets folder", "python dicts"]
"""The forms that hold lists and nulls (a text file has no null: an empty cell is the empty string)."""


def write_form(form: str, folder: Path, rows: list[dict]) -> tuple[Source, TableLayout]:
    """`rows` written in `form` under `folder`: the source to read and its layout."""
    return WRITERS[form](folder, rows)
