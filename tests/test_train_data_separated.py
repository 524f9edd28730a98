"""`.txt` data files of columns split at `separator` (E2E NLG's `meaning representation||reference`):
they give the records the same rows give as JSON Lines (the reference), with or without a header
line; a line with another number of values, a .txt file without a separator, and a bad separator are
refused in one line that names the file and line (or the field), and a new setting is part of the run's
identity that older checkpoints resume under."""

from __future__ import annotations

import pytest
import yaml

from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.data import DataError, TableLayout, read_records
from deltatune.train.fingerprint import ADDED_LATER, run_record
from training_fixtures import task_config, write_jsonl

ROWS = [
    {"prompt": "name : Blue Spice | Type : coffee shop | area : city centre", "completion": "A coffee shop ."},
    {"prompt": "name : Alimentum | area : riverside", "completion": "Alimentum is by the river , with a | in it ."},
    {"prompt": "name : Aromi | food : Thai", "completion": "Aromi serves Thai food."},
]
E2E = TableLayout(header=False, column_names=("prompt", "completion"), separator="||")


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_separated_text_file_gives_the_records_its_rows_give_as_jsonl(tmp_path) -> None:
    lines = [f"{row['prompt']}||{row['completion']} " for row in ROWS]  # E2E's references end in a space
    lines.insert(2, "   ")
    expected = read_records(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    records = read_records(write_lines(tmp_path / "e2e.txt", lines), layout=E2E)
    assert [record.fields for record in records] == [record.fields for record in expected]
    assert [record.where for record in records] == ["e2e.txt line 1", "e2e.txt line 2", "e2e.txt line 4"]


def test_a_header_line_names_the_columns_of_a_separated_text_file(tmp_path) -> None:
    lines = ["prompt || completion", *(f"{row['prompt']} || {row['completion']}" for row in ROWS)]
    records = read_records(write_lines(tmp_path / "e2e.txt", lines), layout=TableLayout(separator="||"))
    assert [record.fields for record in records] == ROWS and records[0].where == "e2e.txt line 2"


@pytest.mark.parametrize("line", ["name : Aromi | food : Thai", "a||b||c"])
def test_a_line_without_one_value_per_column_is_refused_naming_the_file_and_line(tmp_path, line: str) -> None:
    path = write_lines(tmp_path / "e2e.txt", [f"{ROWS[0]['prompt']}||{ROWS[0]['completion']}", line])
    with pytest.raises(DataError, match=r"^e2e.txt line 2: [13] value\(s\) split at '\|\|', but column_names"):
        read_records(path, layout=E2E)


def test_a_text_file_without_a_separator_is_refused_naming_the_setting(tmp_path, capsys) -> None:
    path = write_lines(tmp_path / "e2e.txt", ["a||b"])
    with pytest.raises(DataError, match=r"^e2e.txt: a .txt file is read as lines of columns split at a separator; set"):
        read_records(path)
    config = task_config(tmp_path, "causal-lm", eval_file=path)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and 'separator: "||"' in error


@pytest.mark.parametrize("value", ['""', '"a\\nb"'])
def test_an_empty_or_multiline_separator_is_refused(tmp_path, capsys, value: str) -> None:
    config = task_config(tmp_path, "causal-lm")
    capsys.readouterr()
    assert main(["train", str(config), f"separator={value}", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "separator must be a non-empty string without line breaks or null" in error


def test_the_separator_is_part_of_the_run_identity_and_older_runs_had_none(tmp_path) -> None:
    base = yaml.safe_load(task_config(tmp_path, "causal-lm").read_text())

    def fingerprint(**settings) -> dict:
        return run_record(TrainConfig.from_dict({**base, **settings}), [], 1)["fingerprint"]

    assert fingerprint(separator="||") != fingerprint(separator="\t") and fingerprint()["separator"] is None
    assert ADDED_LATER["separator"] is None
