"""Parquet and Arrow files and folders saved by `datasets` as train_file / eval_file: they give the
records the same rows give as JSON Lines (the reference), and a run trained from them computes the
same losses as one trained from the JSONL file; without the packages, one line names the extra."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deltatune.train.cli import main
from deltatune.train.data import DataError, read_records
from training_fixtures import records, task_config, write_jsonl

ROWS = [
    {"text": "red cat", "label": "yes", "score": 1},
    {"text": "blue, dog", "label": "no", "score": -2},
    {"text": "big fish", "label": "yes", "score": 7},
]


def needs_datasets():
    return pytest.importorskip("datasets", reason="datasets is not installed (pip install 'deltatune[data]')")


def saved_forms(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as a parquet file, a save_to_disk folder, its Arrow stream shard and a Feather file."""
    datasets = needs_datasets()
    import pyarrow
    import pyarrow.feather

    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    (shard,) = (tmp_path / "saved").glob("*.arrow")
    pyarrow.feather.write_feather(pyarrow.Table.from_pylist(rows), str(tmp_path / "rows.arrow"))
    return {
        "parquet": tmp_path / "rows.parquet",
        "folder": tmp_path / "saved",
        "stream": shard,
        "feather": tmp_path / "rows.arrow",
    }


def test_parquet_arrow_and_saved_folders_give_the_records_jsonl_gives(tmp_path) -> None:
    expected = [record.fields for record in read_records(write_jsonl(tmp_path / "rows.jsonl", ROWS))]
    for form, path in saved_forms(tmp_path, ROWS).items():
        assert [record.fields for record in read_records(path)] == expected, form
    assert read_records(tmp_path / "rows.parquet")[2].where == "rows.parquet row 2"


def test_a_datasets_folder_and_a_parquet_file_train_as_the_jsonl_file_does(tmp_path) -> None:
    rows = records("seq-cls")
    forms = saved_forms(tmp_path, rows)
    histories = []
    for name, train_file, eval_file in (
        ("jsonl", write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "train.jsonl"),
        ("datasets", forms["folder"], forms["parquet"]),
    ):
        config = task_config(
            tmp_path, "seq-cls", train_file=train_file, eval_file=eval_file, output_dir=tmp_path / name
        )
        assert main(["train", str(config), "--quiet"]) == 0
        histories.append(json.loads((tmp_path / name / "metrics.json").read_text())["history"])
    assert histories[0] == histories[1]
    assert len([row for row in histories[1] if "loss" in row]) == 6


def test_a_datasetdict_folder_names_its_splits(tmp_path) -> None:
    datasets = needs_datasets()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match="holds the splits train; give one split's folder, e.g. .*splits/train"):
        read_records(tmp_path / "splits")
    assert len(read_records(tmp_path / "splits" / "train")) == 3


def test_a_folder_not_saved_by_datasets_is_refused(tmp_path) -> None:
    needs_datasets()
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets' save_to_disk"):
        read_records(tmp_path / "plain")


def test_a_file_that_is_not_parquet_is_refused_in_one_line(tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'deltatune[data]')")
    (tmp_path / "rows.parquet").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="rows.parquet: not a readable parquet file"):
        read_records(tmp_path / "rows.parquet")
    (tmp_path / "rows.arrow").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="rows.arrow: not an Arrow IPC stream or file"):
        read_records(tmp_path / "rows.arrow")


@pytest.mark.parametrize(
    "name,package", [("rows.parquet", "pyarrow"), ("rows.arrow", "pyarrow"), ("saved", "datasets")]
)
def test_without_the_package_a_path_is_one_line_naming_the_extra(
    tmp_path, monkeypatch, name: str, package: str
) -> None:
    path = tmp_path / name
    path.mkdir() if "." not in name else path.write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *rest: None if module == package else real(module, *rest)
    )
    with pytest.raises(DataError, match=rf"needs the {package} package: pip install 'deltatune\[data\]'$"):
        read_records(path)


NAMED_ROWS = [
    {"text": "red cat", "label": "yes", "tags": ["B", "O"]},
    {"text": "blue dog", "label": "no", "tags": ["O"]},
    {"text": "big fish", "label": None, "tags": []},
]
"""Rows of names, as a JSON Lines file holds them (the reference); the null label is `datasets`' id -1."""


def class_label_forms(tmp_path: Path, label_names: list[str], tag_names: list[str]) -> dict[str, object]:
    """NAMED_ROWS as `datasets` stores them under these ClassLabel lists (ids, -1 for no label): a saved folder,
    its Arrow stream shard, a parquet file and the `Dataset` itself."""
    datasets = needs_datasets()
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=label_names),
            "tags": datasets.Sequence(datasets.ClassLabel(names=tag_names)),
        }
    )
    ids = [
        {
            "text": row["text"],
            "label": -1 if row["label"] is None else label_names.index(row["label"]),
            "tags": [tag_names.index(tag) for tag in row["tags"]],
        }
        for row in NAMED_ROWS
    ]
    dataset = datasets.Dataset.from_list(ids, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    (shard,) = (tmp_path / "saved").glob("*.arrow")
    return {"folder": tmp_path / "saved", "stream": shard, "parquet": tmp_path / "rows.parquet", "python": dataset}


@pytest.mark.parametrize("label_names", [["no", "yes"], ["yes", "no"]])
def test_classlabel_columns_read_as_their_names_as_jsonl_gives_them(tmp_path, label_names: list[str]) -> None:
    expected = [record.fields for record in read_records(write_jsonl(tmp_path / "rows.jsonl", NAMED_ROWS))]
    for form, source in class_label_forms(tmp_path, label_names, ["O", "B"]).items():
        assert [record.fields for record in read_records(source)] == expected, form


def test_a_class_id_past_the_classlabel_names_is_refused_naming_the_row(tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'deltatune[data]')")
    import pyarrow
    import pyarrow.parquet

    features = {"label": {"names": ["no", "yes"], "_type": "ClassLabel"}}
    schema = pyarrow.schema(
        [("label", pyarrow.int64())], metadata={"huggingface": json.dumps({"info": {"features": features}})}
    )
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"label": 1}, {"label": 2}], schema=schema), tmp_path / "rows.parquet"
    )
    with pytest.raises(
        DataError, match=r"rows.parquet row 1: field 'label' holds the class id 2, but its ClassLabel names 2"
    ):
        read_records(tmp_path / "rows.parquet")


def test_a_classlabel_folder_trains_and_scores_as_the_same_names_in_jsonl_do(tmp_path, capsys) -> None:
    """Train and eval folders listing the classes in other orders: the run equals the one from JSON Lines of names
    (the same losses, id2label of the names), and each eval folder scores as the JSONL file does."""
    datasets = needs_datasets()
    rows = records("seq-cls")

    def saved(name: str, label_names: list[str]) -> Path:
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)}
        )
        ids = [{"text": row["text"], "label": label_names.index(row["label"])} for row in rows]
        datasets.Dataset.from_list(ids, features=features).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    runs = {}
    for name, train_file in (("jsonl", jsonl), ("datasets", saved("train", ["no", "yes"]))):
        config = task_config(tmp_path, "seq-cls", train_file=train_file, eval_file=jsonl, output_dir=tmp_path / name)
        assert main(["train", str(config), "--quiet"]) == 0
        adapter_config = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        runs[name] = (
            json.loads((tmp_path / name / "metrics.json").read_text())["history"],
            adapter_config["task"]["id2label"],
        )
    assert runs["datasets"] == runs["jsonl"]
    assert sorted(runs["jsonl"][1].values()) == ["no", "yes"]
    scores = []
    for eval_file in (jsonl, saved("dev_same", ["no", "yes"]), saved("dev_other_order", ["yes", "no"])):
        capsys.readouterr()
        assert main(["eval", str(config), f"eval_file={eval_file}"]) == 0
        output = capsys.readouterr().out
        scores.append(json.loads(output[output.index("{") :]))
    assert scores[1] == scores[0] and scores[2] == scores[0]
