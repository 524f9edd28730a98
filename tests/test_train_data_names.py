"""One value a field name, whatever the form: a header, `column_names`, a JSON object or an Arrow table
that names a column twice is refused, and so is a `columns` rename onto a name the record already has
or two renames onto one name; otherwise one of the values would be dropped, chosen by column order,
without a word. A rename onto a name that is itself renamed away keeps both values (the reference: the
rows renamed by hand). Each refusal is one line naming the file, the line or row, and the names."""

from __future__ import annotations

import re

import pytest

from data_forms import ALL_FORMS, TABLE_FORMS, pyarrow_modules, write_form, write_table
from deltatune.train.cli import main
from deltatune.train.data import DataError, TableLayout, read_records
from training_fixtures import task_config

ROWS = [
    {"text": "good film", "label": "1", "label_text": "positive"},
    {"text": "bad film", "label": "0", "label_text": "negative"},
]


def first_where(source, layout: TableLayout) -> str:
    return read_records(source, layout=layout)[0].where


@pytest.mark.parametrize("order", [("text", "label", "label_text"), ("text", "label_text", "label")])
@pytest.mark.parametrize("form", ALL_FORMS)
def test_a_rename_onto_a_field_the_record_already_has_is_refused_naming_both(tmp_path, form: str, order) -> None:
    source, layout = write_form(form, tmp_path, [{name: row[name] for name in order} for row in ROWS])
    where = re.escape(first_where(source, layout))
    with pytest.raises(DataError, match=rf"^{where}: columns renames 'label_text' to 'label', but the record already"):
        read_records(source, {"label_text": "label"}, layout)


@pytest.mark.parametrize("form", ALL_FORMS)
def test_two_renames_onto_one_name_are_refused_naming_both(tmp_path, form: str) -> None:
    source, layout = write_form(form, tmp_path, ROWS)
    with pytest.raises(DataError, match=r"^columns renames both 'label_text' and 'label' to 'y'; "):
        read_records(source, {"label_text": "y", "label": "y"}, layout)


@pytest.mark.parametrize(
    "columns,renamed",
    [
        ({"label_text": "label", "label": "label_id"}, {"label": "label_text", "label_id": "label"}),
        ({"label_text": "label", "label": "label_text"}, {"label": "label_text", "label_text": "label"}),
    ],
)
@pytest.mark.parametrize("form", ALL_FORMS)
def test_a_rename_onto_a_name_renamed_away_keeps_every_value(tmp_path, form: str, columns, renamed) -> None:
    source, layout = write_form(form, tmp_path, ROWS)
    expected = [{name: row[renamed.get(name, name)] for name in ["text", *renamed]} for row in ROWS]
    assert [record.fields for record in read_records(source, columns, layout)] == expected


@pytest.mark.parametrize(
    "name,text,layout",
    [
        ("rows.csv", "text,label,text\ngreat film,pos,(translated) film\n", TableLayout()),
        ("rows.tsv", "text\tlabel\ttext\ngreat film\tpos\t(translated) film\n", TableLayout()),
        (
            "rows.txt",
            "prompt||completion||completion\nname[Aromi]||A pub.||(second) A pub.\n",
            TableLayout(separator="||"),
        ),
    ],
)
def test_a_header_that_names_a_column_twice_is_refused_naming_the_line_and_column(
    tmp_path, name: str, text: str, layout: TableLayout
) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(name)} line 1 \(the header\) names the column '\w+' twice"):
        read_records(tmp_path / name, layout=layout)


@pytest.mark.parametrize("name,separator", [("rows.csv", None), ("rows.txt", "||")])
def test_column_names_that_name_a_column_twice_are_refused_by_the_reader_too(
    tmp_path, name: str, separator: str | None
) -> None:
    (tmp_path / name).write_text("a||b||c\n" if separator else "a,b,c\n", encoding="utf-8")
    layout = TableLayout(header=False, column_names=("text", "label", "text"), separator=separator)
    with pytest.raises(DataError, match=rf"^{re.escape(name)}: column_names names the column 'text' twice"):
        read_records(tmp_path / name, layout=layout)


@pytest.mark.parametrize(
    "line,name",
    [
        ('{"text": "great film", "label": "pos", "text": "(translated) film"}', "text"),
        ('{"messages": [{"role": "user", "content": "hi", "content": "bye"}]}', "content"),
    ],
)
def test_a_json_object_that_names_a_field_twice_is_refused_naming_the_line(tmp_path, line: str, name: str) -> None:
    (tmp_path / "rows.jsonl").write_text('{"text": "fine", "label": "pos"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^rows.jsonl line 2: a JSON object names the field '{name}' twice"):
        read_records(tmp_path / "rows.jsonl")


@pytest.mark.parametrize("form", TABLE_FORMS)
def test_an_arrow_table_that_names_a_column_twice_is_refused_in_one_line(tmp_path, form: str) -> None:
    pyarrow = pyarrow_modules()
    table = pyarrow.table([pyarrow.array(["great film"]), pyarrow.array(["(translated) film"])], names=["text"] * 2)
    path = write_table(form, tmp_path, table)
    with pytest.raises(DataError, match=rf"^{path.name}: the table names the column 'text' twice") as error:
        read_records(path)
    assert "\n" not in str(error.value)


def test_a_python_record_that_is_not_a_dict_is_refused_naming_it() -> None:
    with pytest.raises(DataError, match=r"^record 1: expected a dict of fields, got list"):
        read_records([{"text": "fine"}, [("text", "great film"), ("text", "(translated) film")]])


@pytest.mark.parametrize(
    "header,settings,message",
    [
        ("text,label,label_text", {"columns": {"label_text": "label"}}, "columns renames 'label_text' to 'label'"),
        ("text,label,text", {}, "line 1 (the header) names the column 'text' twice"),
    ],
)
def test_deltatune_train_refuses_a_name_twice_in_one_line(
    tmp_path, capsys, header: str, settings: dict, message: str
) -> None:
    data = tmp_path / "train.csv"
    data.write_text(f"{header}\nred cat good,yes,positive\nblue dog bad,no,negative\n", encoding="utf-8")
    config = task_config(tmp_path, "seq-cls", train_file=data, eval_file=data, **settings)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "train.csv" in error and message in error, error
