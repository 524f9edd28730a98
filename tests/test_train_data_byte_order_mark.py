"""A text data file saved with a UTF-8 byte-order mark (Notepad's "UTF-8 with BOM", Excel's "CSV UTF-8")
gives the records the same file gives without the mark (the reference): the mark is no part of the
first value, nor of the first column's name, nor a reason to refuse a JSON line."""

from __future__ import annotations

import pytest

from deltatune.train.data import TableLayout, read_records

pytestmark = pytest.mark.transformers_independent  # data files read as text

BYTE_ORDER_MARK = "\ufeff"
E2E = TableLayout(header=False, column_names=("prompt", "completion"), separator="||")
FILES = {
    "jsonl, one object a line": (
        "rows.jsonl",
        '{"prompt": "name[Aromi]", "completion": "Aromi."}\n{"prompt": "name[Zizzi]", "completion": "Zizzi."}\n',
        TableLayout(),
    ),
    "csv with a header": ("rows.csv", "prompt,completion\r\nname[Aromi],Aromi.\r\n", TableLayout()),
    "csv without a header": (
        "rows.csv",
        "name[Aromi],Aromi.\r\nname[Zizzi],Zizzi.\r\n",
        TableLayout(header=False, column_names=("prompt", "completion")),
    ),
    "tsv with a header": ("rows.tsv", "prompt\tcompletion\nname[Aromi]\tAromi.\n", TableLayout()),
    "txt with a header": ("rows.txt", "prompt||completion\nname[Aromi]||Aromi.\n", TableLayout(separator="||")),
    "txt without a header": ("rows.txt", "name[Aromi], eatType[pub]||Aromi is a pub.\r\nname[Zizzi]||Zizzi.\r\n", E2E),
}


@pytest.mark.parametrize("case", list(FILES))
def test_a_byte_order_mark_is_no_part_of_the_first_record(tmp_path, case: str) -> None:
    name, text, layout = FILES[case]
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir(), marked.mkdir()
    (plain / name).write_bytes(text.encode("utf-8"))
    (marked / name).write_bytes((BYTE_ORDER_MARK + text).encode("utf-8"))
    expected = [record.fields for record in read_records(plain / name, layout=layout)]
    assert [record.fields for record in read_records(marked / name, layout=layout)] == expected
    assert list(expected[0]) == ["prompt", "completion"]
