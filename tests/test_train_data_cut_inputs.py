"""Inputs that max_length cuts are counted in one notice a data set: classification texts, a seq2seq
source and embedding texts lose their ends, token classification loses the tags of the words cut."""

from __future__ import annotations

import warnings

import pytest

from deltatune.errors import CutInputsWarning, CutWordsWarning, MaxLengthCutWarning
from deltatune.train.data import read_records
from deltatune.train.encode import EncodeContext
from deltatune.train.tasks import get_task
from training_fixtures import word_tokenizer

SHORT, LONG = "the cat is red", "the cat is red and the dog is blue and the bird is green"
"""4 and 14 words: with [CLS] and [SEP] 6 and 16 tokens."""

RECORDS = {
    "seq-cls": [{"text": SHORT, "label": "a"}, {"text": LONG, "label": "b"}, {"text": LONG, "label": "a"}],
    "seq2seq-lm": [
        {"prompt": SHORT, "completion": "yes"},
        {"prompt": LONG, "completion": "no"},
        {"prompt": LONG, "completion": "yes"},
    ],
    "feature-extraction": [
        {"text": SHORT, "positive": SHORT},
        {"text": LONG, "positive": SHORT},
        {"text": SHORT, "positive": LONG},
    ],
}
"""Three records a task; the second and third have an input longer than max_length=10."""


def encoded_with_notices(task: str, rows: list[dict], max_length: int, **settings) -> tuple[list, list]:
    settings.setdefault("label_ids", {"a": 0, "b": 1})
    context = EncodeContext(word_tokenizer(pair_template=True), max_length, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = get_task(task).encode(read_records(rows), context)
    return features, [notice for notice in caught if issubclass(notice.category, MaxLengthCutWarning)]


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_inputs_cut_by_max_length_are_counted_in_one_notice(task: str) -> None:
    features, [notice] = encoded_with_notices(task, RECORDS[task], 10)
    assert all(len(feature["input_ids"]) <= 10 for feature in features)
    assert issubclass(notice.category, CutInputsWarning)
    assert str(notice.message) == (
        "2 of 3 records have a text longer than max_length=10 tokens (the first: record 1), so max_length cut its end: "
        "the model never sees it, in training or evaluation; raise max_length to 16 to keep them whole"
    )
    _, notices = encoded_with_notices(task, RECORDS[task], 16)
    assert notices == []


def test_inputs_kept_whole_are_encoded_as_before() -> None:
    features, _ = encoded_with_notices("seq-cls", RECORDS["seq-cls"], 10)
    tokenizer = word_tokenizer(pair_template=True)
    assert features[0]["input_ids"] == tokenizer(SHORT)["input_ids"]
    assert features[1]["input_ids"] == tokenizer(LONG, truncation=True, max_length=10)["input_ids"]


def test_a_pair_is_measured_whole() -> None:
    rows = [{"text": SHORT, "text_pair": LONG, "label": "a"}, {"text": SHORT, "text_pair": SHORT, "label": "b"}]
    _, [notice] = encoded_with_notices("seq-cls", rows, 16)
    assert "1 of 2 records" in str(notice.message) and "raise max_length to 21 " in str(notice.message)


def test_token_classification_counts_the_words_that_lose_their_tags() -> None:
    words = LONG.split()
    rows = [
        {"tokens": words[:4], "tags": ["O"] * 4},
        {"tokens": words, "tags": ["O"] * len(words)},
        {"tokens": words[:12], "tags": ["O"] * 12},
    ]
    features, [notice] = encoded_with_notices("token-cls", rows, 10, label_ids={"O": 0})
    assert [sum(label != -100 for label in feature["labels"]) for feature in features] == [4, 8, 8]
    assert issubclass(notice.category, CutWordsWarning)
    assert str(notice.message) == (
        "2 of 3 records are longer than max_length=10 tokens (the first: record 1): max_length cut 10 of their words, "
        "which are neither trained on nor scored; raise max_length to 16 to keep them whole"
    )
