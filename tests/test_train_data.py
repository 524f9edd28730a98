"""Reading records (JSONL, CSV, TSV, `datasets`-like objects) and encoding them per task: the loss
falls on completions only, chat formats render through the template, errors name line and field."""

from __future__ import annotations

import re
import warnings

import pytest

from deltatune.errors import CutCompletionsWarning
from deltatune.train import encode as encoding
from deltatune.train.data import DataError, read_records
from deltatune.train.encode import EncodeContext, collate
from deltatune.train.tasks import get_task
from training_fixtures import word_tokenizer, write_jsonl


def encode(task: str, records: list, context: EncodeContext) -> list[dict]:
    return get_task(task).encode(records, context)


def label_names(task: str, records: list) -> list[str]:
    return encoding.label_names(get_task(task).label_field, records)


def context(**settings) -> EncodeContext:
    return EncodeContext(word_tokenizer(pair_template=False), max_length=32, **settings)


def test_jsonl_csv_tsv_and_iterables_give_the_same_records(tmp_path) -> None:
    rows = [{"text": "red cat", "label": "yes"}, {"text": "blue, dog", "label": "no"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.csv").write_text('text,label\nred cat,yes\n"blue, dog",no\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("text\tlabel\nred cat\tyes\nblue, dog\tno\n", encoding="utf-8")
    for source in (tmp_path / "a.jsonl", tmp_path / "a.csv", str(tmp_path / "a.tsv"), iter(rows)):
        assert [record.fields for record in read_records(source)] == rows
    assert read_records(tmp_path / "a.csv")[1].where == "a.csv line 3"
    renamed = read_records(tmp_path / "a.tsv", columns={"text": "sentence"})
    assert renamed[0].fields == {"sentence": "red cat", "label": "yes"}


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"text": "a"}\n[1, 2]\n', "a.jsonl line 2: expected a JSON object"),
        ('{"text": "a"}\n\n{"text": \n', "a.jsonl line 3: not valid JSON"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, content: str, message: str) -> None:
    (tmp_path / "a.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / "a.jsonl")


def test_a_csv_row_with_extra_columns_names_the_line(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("text,label\nred,yes\nblue,no,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match="a.csv line 3: the row has a different number of columns"):
        read_records(tmp_path / "a.csv")


def test_a_tsv_has_no_quoting_so_each_line_is_one_record_as_written(tmp_path) -> None:
    texts = ['"great" fun , really', '" a dull , lifeless film', "a fine cast", "utterly boring", 'the "best" of it']
    lines = ["sentence\tlabel"] + [f"{text}\t{index % 2}" for index, text in enumerate(texts)]
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = read_records(tmp_path / "a.tsv")
    assert [record.fields["sentence"] for record in records] == texts
    assert [record.where for record in records] == [f"a.tsv line {number}" for number in range(2, 7)]


@pytest.mark.parametrize(
    "row,lines", [('"great" fun,1', "line 3: ',' expected"), ('"a stray quote,1\nbad film,0', "lines 3-4: unexpected")]
)
def test_a_csv_cell_with_malformed_quoting_names_the_line(tmp_path, row: str, lines: str) -> None:
    (tmp_path / "a.csv").write_text(f"text,label\nred,yes\n{row}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"a.csv {lines}.*; a cell holding a comma, a quote or a line end must be"):
        read_records(tmp_path / "a.csv")


def test_unknown_suffix_and_missing_file_are_clear(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown data file type '.xlsx'"):
        read_records(tmp_path / "a.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "a.jsonl")


def test_prompt_completion_learns_the_completion_only() -> None:
    records = read_records([{"prompt": "red cat", "completion": "the cat"}])
    [feature] = encode("causal-lm", records, context())
    tokenizer = context().tokenizer
    prompt_length = feature["prompt_length"]
    assert feature["labels"][:prompt_length] == [-100] * prompt_length
    assert tokenizer.decode(feature["labels"][prompt_length:]) == "the cat </s>"
    assert feature["input_ids"][prompt_length:] == feature["labels"][prompt_length:]


CUT_ROWS = [
    {"prompt": "what color is the cat", "completion": " the cat is red"},
    {"prompt": "what color is the cat", "completion": " the cat is red and the dog is blue and the bird is green"},
    {"prompt": "one two three four five six seven eight nine ten", "completion": " yes"},
    {"prompt": "what color is the cat", "completion": " the cat is red and the dog is blue and the bird is green"},
]
"""Four language-model records: with max_length=12, the second and fourth have their completion cut, and in
causal-lm (where the prompt counts too) the third."""


@pytest.mark.parametrize("task,count,longest", [("causal-lm", 3, 21), ("seq2seq-lm", 2, 15)])
def test_completions_cut_by_max_length_are_counted_in_one_notice(task: str, count: int, longest: int) -> None:
    tokenizer = word_tokenizer(pair_template=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = encode(task, read_records(CUT_ROWS), EncodeContext(tokenizer, 12))
    assert [len(feature["labels"]) <= 12 for feature in features] == [True] * 4
    [notice] = caught
    assert issubclass(notice.category, CutCompletionsWarning)
    assert str(notice.message) == (
        f"{count} of 4 records are longer than max_length=12 tokens (the first: record 1), so max_length cut their "
        f"completions: their ends are not trained on (nor counted in the eval loss); raise max_length to {longest} to "
        "keep them whole"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(task, read_records(CUT_ROWS), EncodeContext(tokenizer, longest))
    assert caught == []


def test_chat_template_renders_prompt_and_learns_the_assistant_turn() -> None:
    records = read_records(
        [
            {"prompt": "red cat", "completion": "the cat"},
            {"messages": [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "the cat"}]},
        ]
    )
    settings = context(chat_template=True)
    plain, chat = encode("causal-lm", records, settings)
    assert plain["input_ids"] == chat["input_ids"] and plain["labels"] == chat["labels"]
    tokenizer = settings.tokenizer
    assert tokenizer.decode(chat["input_ids"][: chat["prompt_length"]]) == "<user> red cat </s> <bot>"
    assert tokenizer.decode(chat["labels"][chat["prompt_length"] :]) == "the cat </s>"
    with_system = encode("causal-lm", records[:1], context(chat_template=True, system_prompt="color"))[0]
    assert tokenizer.decode(with_system["input_ids"]).startswith("<sys> color </s> <user>")


def test_messages_must_end_with_the_assistant() -> None:
    records = read_records([{"messages": [{"role": "user", "content": "red"}]}])
    with pytest.raises(DataError, match="record 0: field 'messages' must end with an assistant message"):
        encode("causal-lm", records, context())


def test_a_missing_field_names_the_record_and_field(tmp_path) -> None:
    records = read_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "red", "label": "yes"}, {"text": "blue"}]))
    with pytest.raises(DataError, match="d.jsonl line 2: field 'label' is missing"):
        encode("seq-cls", records, context(label_ids={"yes": 0}))


def test_labels_map_in_sorted_order_and_unknown_labels_are_errors() -> None:
    records = read_records([{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}])
    assert label_names("seq-cls", records) == ["2", "10"]
    features = encode("seq-cls", records, context(label_ids={"2": 0, "10": 1}))
    assert [feature["labels"] for feature in features] == [1, 0, 0]
    with pytest.raises(DataError, match="label 'cat' is not among the training labels"):
        encode("seq-cls", read_records([{"text": "a", "label": "cat"}]), context(label_ids={"2": 0}))


def test_token_labels_go_to_the_first_piece_of_each_word_and_qa_finds_the_span() -> None:
    tokenizer = word_tokenizer(pair_template=True)
    tagged = encode(
        "token-cls",
        read_records([{"tokens": ["red", "cat"], "tags": ["O", "ANIMAL"]}]),
        EncodeContext(tokenizer, 16, label_ids={"ANIMAL": 0, "O": 1}),
    )
    assert tagged[0]["labels"] == [-100, 1, 0, -100]
    answered = encode(
        "qa",
        read_records([{"question": "where is the cat", "context": "the cat is in rome", "answer": "rome"}]),
        EncodeContext(tokenizer, 32),
    )
    feature = answered[0]
    assert tokenizer.decode(feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1]) == "rome"
    with pytest.raises(DataError, match="the answer 'oslo' is not in the context"):
        encode(
            "qa",
            read_records([{"question": "where", "context": "in rome", "answer": "oslo"}]),
            EncodeContext(tokenizer, 32),
        )


def qa_span(answer: str, max_length: int = 32, passage: str = "the cat is in rome at six") -> str:
    """The text of the span a QA record with `answer` is trained on."""
    tokenizer = word_tokenizer(pair_template=True)
    row = {"question": "where is the cat", "context": passage, "answer": answer}
    [feature] = encode("qa", read_records([row]), EncodeContext(tokenizer, max_length))
    return tokenizer.decode(feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1])


@pytest.mark.parametrize("answer", [" rome", "rome ", " in rome "])
def test_a_qa_answer_with_surrounding_spaces_is_trained_on_its_words_alone(answer: str) -> None:
    assert qa_span(answer) == answer.strip()


LONG_PASSAGE = "the cat is big and the dog is small and the bird is red and the fish is blue in paris"


@pytest.mark.parametrize("answer,at", [("paris", "27-27"), ("blue in paris", "25-27")])
def test_a_qa_answer_past_max_length_is_refused_saying_what_max_length_keeps_it(answer: str, at: str) -> None:
    with pytest.raises(DataError, match=r"record 0: the answer .* lies past max_length=16") as refused:
        qa_span(answer, max_length=16, passage=LONG_PASSAGE)
    needed = int(re.search(r"raise max_length to (\d+)", str(refused.value))[1])
    assert f"(its tokens are {at} of the 28 that the question and the whole context take)" in str(refused.value)
    assert qa_span(answer, max_length=needed, passage=LONG_PASSAGE) == answer
    with pytest.raises(DataError, match="lies past max_length"):
        qa_span(answer, max_length=needed - 1, passage=LONG_PASSAGE)


def test_collate_pads_each_field_with_its_own_value() -> None:
    batch = collate(
        [
            {
                "input_ids": [5, 6, 7],
                "attention_mask": [1, 1, 1],
                "labels": [-100, 6, 7],
                "reference": "x",
                "prompt_length": 1,
            },
            {"input_ids": [5], "attention_mask": [1], "labels": [5], "reference": "y", "prompt_length": 1},
        ],
        pad_id=0,
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
