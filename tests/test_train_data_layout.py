"""Headerless CSV/TSV files (`header: false`, `column_names`), the error that says a first line that
looks like a record was taken as the header, and `max_train_examples` / `max_eval_examples`: a seeded
sample of the records, in file order, that is part of the run's identity (the eval sample is not)."""

from __future__ import annotations

import json

import pytest
import yaml

from deltatune.train.cli import main
from deltatune.train.config import ConfigError, TrainConfig
from deltatune.train.data import DataError, TableLayout, read_records, subsample
from deltatune.train.encode import EncodeContext, label_names
from deltatune.train.fingerprint import run_record
from deltatune.train.loop import prepare_run
from training_fixtures import records, task_config, write_jsonl

HEADERLESS = TableLayout(header=False, column_names=("label", "text"))


def write_tsv(path, rows: list[dict], header: bool):
    lines = (["label\ttext"] if header else []) + [f"{row['label']}\t{row['text']}" for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_headerless_tsv_gives_the_records_of_the_same_file_with_its_header(tmp_path) -> None:
    rows = records("seq-cls")
    with_header = read_records(write_tsv(tmp_path / "a.tsv", rows, header=True))
    without = read_records(write_tsv(tmp_path / "b.tsv", rows, header=False), layout=HEADERLESS)
    assert [record.fields for record in without] == [record.fields for record in with_header]
    assert without[0].where == "b.tsv line 1"


def test_a_headerless_tsv_trains_with_header_false_as_its_jsonl_rows_do(tmp_path) -> None:
    rows = records("seq-cls")
    headerless = write_tsv(tmp_path / "train.tsv", rows, header=False)
    histories = []
    for name, settings in (
        ("jsonl", {"train_file": write_jsonl(tmp_path / "rows.jsonl", rows)}),
        (
            "tsv",
            {"train_file": headerless, "eval_file": headerless, "header": False, "column_names": ["label", "text"]},
        ),
    ):
        config = task_config(tmp_path, "seq-cls", output_dir=tmp_path / name, **settings)
        assert main(["train", str(config), "--quiet"]) == 0
        histories.append(json.loads((tmp_path / name / "metrics.json").read_text())["history"])
    assert histories[0] == histories[1]


def test_a_header_named_like_a_number_says_the_first_line_was_taken_as_the_header(tmp_path, capsys) -> None:
    data = tmp_path / "sst.tsv"
    data.write_text("1\tred cat good\n0\tblue dog bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sst.tsv line 1 was taken as the header, but its column '1' is named like a"):
        read_records(data)
    config = task_config(tmp_path, "seq-cls", train_file=data, eval_file=data)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "set header: false and column_names" in error


def test_a_headerless_row_with_another_number_of_columns_names_the_line(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("yes,red cat\nno\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.csv line 2: .* different number of columns than column_names \['label'"):
        read_records(tmp_path / "a.csv", layout=HEADERLESS)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"column_names": ["label", "text"]}, "give it with header: false"),
        ({"header": False}, r"and header: false needs it"),
        ({"header": False, "column_names": ["text", "text"]}, "column_names must not repeat a name"),
    ],
)
def test_column_names_and_header_false_go_together(tmp_path, settings: dict, message: str) -> None:
    base = yaml.safe_load(task_config(tmp_path, "seq-cls").read_text())
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**base, **settings})


def test_max_train_examples_is_a_seeded_sample_kept_in_file_order(tmp_path) -> None:
    rows = read_records(write_jsonl(tmp_path / "rows.jsonl", records("seq-cls", count=40)))
    samples = {seed: subsample(rows, 10, seed) for seed in (0, 1)}
    for sample in samples.values():
        lines = [int(record.where.split()[-1]) for record in sample]
        assert len(sample) == 10 and lines == sorted(set(lines))
    assert subsample(rows, 10, 0) == samples[0] and samples[0] != samples[1]
    assert subsample(rows, 40, 0) == rows and subsample(rows, None, 0) == rows


def test_a_run_encodes_only_the_sampled_records(tmp_path) -> None:
    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", max_train_examples=5, max_eval_examples=3))
    run = prepare_run(config)
    chosen = subsample(read_records(config.train_file), 5, config.seed)
    labels = label_names(run.task.label_field, chosen)
    context = EncodeContext(run.tokenizer, config.max_length, label_ids={name: i for i, name in enumerate(labels)})
    assert run.train_features == run.task.encode(chosen, context) and len(run.eval_features) == 3


def test_max_train_examples_is_part_of_the_run_identity_and_max_eval_examples_is_not(tmp_path) -> None:
    base = yaml.safe_load(task_config(tmp_path, "seq-cls").read_text())

    def fingerprint(**settings) -> dict:
        return run_record(TrainConfig.from_dict({**base, **settings}), [], 1)["fingerprint"]

    assert fingerprint(max_train_examples=8) != fingerprint(max_train_examples=9)
    assert fingerprint(max_eval_examples=8) == fingerprint()
