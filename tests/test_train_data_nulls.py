"""A null is no value, in every form that holds one and every task's fields: a null required field, a
null word or tag inside a token-cls list, a null or empty label, and a chat message without a string
role or content are refused in one line naming the record, the field and the position, never read as
the text 'None' (a label class, a word) or as an empty class. A null optional field (`text_pair`,
`answer_start`) means the field is left out: the reference is the same record without it. An empty
answer is SQuAD 2.0's question without an answer: its span is the first token."""

from __future__ import annotations

import re

import pytest

from data_forms import ALL_FORMS, TYPED_FORMS, write_form
from deltatune.train import encode as encoding
from deltatune.train.cli import main
from deltatune.train.data import DataError, read_records
from deltatune.train.encode import EncodeContext
from deltatune.train.tasks import get_task
from training_fixtures import model_folder, records, task_config, word_tokenizer

REQUIRED = {
    "causal-lm": ["prompt", "completion"],
    "seq2seq-lm": ["prompt", "completion"],
    "seq-cls": ["text", "label"],
    "token-cls": ["tokens", "tags"],
    "qa": ["question", "context", "answer"],
    "feature-extraction": ["text", "positive"],
}
"""Task → the fields each of its records must hold."""
LABELS = {"seq-cls": {"no": 0, "yes": 1}, "token-cls": {"NUM": 0, "O": 1}}


def context(task: str) -> EncodeContext:
    return EncodeContext(word_tokenizer(pair_template=True), max_length=32, label_ids=LABELS.get(task, {}))


def read(form: str, folder, rows: list[dict]):
    source, layout = write_form(form, folder, rows)
    return read_records(source, layout=layout)


def encode(task: str, rows) -> list[dict]:
    return get_task(task).encode(rows, context(task))


def label_names(task: str, rows) -> list[str]:
    return encoding.label_names(get_task(task).label_field, rows)


def _refused_when_labels_are_gathered_and_when_encoded(task: str, read_back: list, message: str) -> None:
    """Training data meets the check when its labels are gathered, eval data when it is encoded."""
    with pytest.raises(DataError, match=message):
        label_names(task, read_back)
    with pytest.raises(DataError, match=message):
        encode(task, read_back)


@pytest.mark.parametrize("task,field", [(task, field) for task, fields in REQUIRED.items() for field in fields])
@pytest.mark.parametrize("form", TYPED_FORMS)
def test_a_null_required_field_is_refused_naming_the_record_and_field(tmp_path, form: str, task: str, field: str):
    rows = records(task, count=3)
    rows[1][field] = None
    read_back = read(form, tmp_path, rows)
    where = re.escape(read_back[1].where)
    with pytest.raises(DataError, match=rf"^{where}: field '{field}' is null"):
        label_names(task, read_back) if field in ("label", "tags") else encode(task, read_back)


@pytest.mark.parametrize("field", ["tokens", "tags"])
@pytest.mark.parametrize("form", TYPED_FORMS)
def test_a_null_word_or_tag_is_refused_naming_the_record_field_and_position(tmp_path, form: str, field: str):
    rows = records("token-cls", count=3)
    rows[0][field] = rows[0][field][:2] + [None] + rows[0][field][3:]
    read_back = read(form, tmp_path, rows)
    message = rf"^{re.escape(read_back[0].where)}: field '{field}' holds a null at position 2"
    with pytest.raises(DataError, match=message):
        encode("token-cls", read_back)  # an eval record
    if field == "tags":
        with pytest.raises(DataError, match=message):
            label_names("token-cls", read_back)  # the training labels


@pytest.mark.parametrize("blank", ["", "  "])
@pytest.mark.parametrize("form", ALL_FORMS)
def test_an_empty_label_is_refused_not_made_a_class(tmp_path, form: str, blank: str) -> None:
    rows = records("seq-cls", count=3)
    rows[2]["label"] = blank
    read_back = read(form, tmp_path, rows)
    message = rf"^{re.escape(read_back[2].where)}: field 'label' holds an empty label"
    _refused_when_labels_are_gathered_and_when_encoded("seq-cls", read_back, message)


@pytest.mark.parametrize("form", TYPED_FORMS)
def test_an_empty_tag_is_refused_naming_its_position(tmp_path, form: str) -> None:
    rows = records("token-cls", count=3)
    rows[1]["tags"] = ["O", "", *rows[1]["tags"][2:]]
    read_back = read(form, tmp_path, rows)
    message = rf"^{re.escape(read_back[1].where)}: field 'tags' holds an empty label at position 1"
    _refused_when_labels_are_gathered_and_when_encoded("token-cls", read_back, message)


@pytest.mark.parametrize(
    "messages,message",
    [
        (
            [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": None}],
            "message 1: field 'content'",
        ),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "cat"}], "message 0: field 'content'"),
        ([{"role": None, "content": "red"}, {"role": "assistant", "content": "cat"}], "message 0: field 'role'"),
        (["red cat", {"role": "assistant", "content": "cat"}], "message 0 must be an object with 'role' and 'content'"),
    ],
)
def test_a_message_without_a_string_role_or_content_is_refused_naming_it(tmp_path, messages, message) -> None:
    read_back = read("jsonl", tmp_path, [{"messages": messages}])
    with pytest.raises(DataError, match=rf"^rows.jsonl line 1 {re.escape(message)}"):
        encode("causal-lm", read_back)


@pytest.mark.parametrize("task,field,value", [("seq-cls", "text_pair", "blue dog"), ("qa", "answer_start", 0)])
@pytest.mark.parametrize("form", TYPED_FORMS)
def test_a_null_optional_field_encodes_as_the_record_without_it(tmp_path, form: str, task: str, field, value):
    rows = records(task, count=2)
    with_null = [{**rows[0], field: None}, {**rows[1], field: value}]
    [null_read, _] = read(form, tmp_path, with_null)
    assert encode(task, [null_read]) == encode(task, read_records(rows[:1]))


@pytest.mark.parametrize("value", ["abc", 1.5, float("nan"), True, [3]])
def test_an_answer_start_that_is_not_a_whole_number_is_refused(value) -> None:
    row = {"question": "where", "context": "in rome", "answer": "rome", "answer_start": value}
    with pytest.raises(DataError, match=r"^record 0: field 'answer_start' must be a whole number \(the answer's"):
        encode("qa", read_records([row]))


@pytest.mark.parametrize("value", ["3", 3.0, ""])
def test_an_answer_start_as_text_or_whole_float_is_read_as_its_number(value) -> None:
    row = {"question": "where", "context": "in rome", "answer": "rome"}
    expected = encode("qa", read_records([{**row, "answer_start": 3}]))
    assert encode("qa", read_records([{**row, "answer_start": value}])) == expected


def test_an_empty_answer_targets_the_first_token_as_squad_2_marks_no_answer() -> None:
    row = {"question": "where is the cat", "context": "the cat is in rome", "answer": ""}
    [feature] = encode("qa", read_records([row]))
    assert (feature["start_positions"], feature["end_positions"]) == (0, 0)
    assert feature["input_ids"][0] == context("qa").tokenizer.cls_token_id


def test_deltatune_train_refuses_a_null_tag_in_one_line_and_saves_nothing(tmp_path, capsys) -> None:
    rows = records("token-cls")
    rows[0]["tags"] = rows[0]["tags"][:2] + [None] + rows[0]["tags"][3:]
    source, _ = write_form("parquet", tmp_path, rows)
    model = model_folder(tmp_path, "feature-extraction")  # a plain encoder: its head is new, sized by the labels
    config = task_config(tmp_path, "token-cls", train_file=source, eval_file=source, model=model)
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "rows.parquet row 0: field 'tags' holds a null at position 2" in error, error
    assert not (tmp_path / "out" / "adapter").exists()
