"""Records → token ids, per task; and the collate function that pads them into a batch.

Language models learn the completion only: prompt positions get label -100. With `chat_template` the
prompt becomes a user turn (after an optional system turn) rendered by the tokenizer's chat template,
and the completion is the assistant turn, end-of-turn marker included; `messages` records are rendered
whole and the last (assistant) message is learned. Without a template the completion follows the prompt
as it is (put a leading space in it if your tokenizer needs one) and ends with EOS. What max_length
cuts is counted in one notice a data set and kind (`max_length_cuts.py`): a completion loses its end
(in causal-lm its EOS too), an input text its end, token classification the tags of the words cut.
Classification labels are mapped to ids in sorted order of the training labels (`label_names`); the
training data must hold at least two (with one, transformers would train a regression).

A null is no value: a null required field, a null word or tag inside `tokens` / `tags`, a null or empty
label, and a chat message without a string `role` and `content` are refused naming the record (and the
position), never read as the text 'None' or as a class ''. A null optional field is the field left
out: `text_pair` null is no pair, `answer_start` null (or an empty cell) the answer's first occurrence
in the context. Texts are taken as they are: an empty CSV cell is the empty text.

A QA answer is trained as the span of the tokens its text covers, its surrounding spaces left out (a
CSV cell after `, `); an empty answer (or one of spaces only) is SQuAD 2.0's no answer, the first
token. There is no document stride: an answer that max_length cuts out of the context, whole or in
part, is refused naming the record and the max_length that keeps it, in training and evaluation
alike, since a row trained toward no answer teaches what evaluation never answers and a row left out
would change what the metrics measure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..losses import IGNORE_INDEX
from .data import DataError, Record
from .max_length_cuts import Cut, CutLog, tokenize_within


@dataclass
class EncodeContext:
    """What encoding needs besides the record."""

    tokenizer: Any
    max_length: int
    chat_template: bool = False
    system_prompt: str | None = None
    label_ids: dict[str, int] = field(default_factory=dict)
    cut: CutLog = field(default_factory=CutLog)
    """Filled while encoding: the records max_length cut, for one notice a data set and kind."""


@dataclass(frozen=True)
class LabelField:
    """Where a classification task's records hold label names: the field, and whether it holds one
    label per word (token classification) or one per record."""

    name: str
    per_word: bool = False


SEQUENCE_LABEL = LabelField("label")
"""seq-cls: one label a record."""
WORD_TAGS = LabelField("tags", per_word=True)
"""token-cls: a tag a word."""
LABEL_KINDS = (str, int)
"""What a label or tag may be: a name, or a class number (a data set's ClassLabel ids)."""


def prompt_text(context: EncodeContext, prompt: str) -> str:
    """The text the model sees before its answer (the generation prompt under a chat template)."""
    if not context.chat_template:
        return prompt
    return render_chat(context, _chat(context, prompt), add_generation_prompt=True)


def _chat(context: EncodeContext, prompt: str, completion: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": context.system_prompt}] if context.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def render_chat(context: EncodeContext, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(context.tokenizer, "chat_template", None):
        raise DataError(
            "chat data needs a tokenizer with a chat template; this tokenizer has none (set chat_template: false and "
            "use prompt/completion)"
        )
    return context.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _lm_texts(record: Record, context: EncodeContext) -> tuple[str, str, str]:
    """(prompt text, completion text as trained, reference answer) of a causal-LM record."""
    if "messages" in record.fields:
        messages = record.get("messages", list)
        for index, message in enumerate(messages):
            _check_message(record, index, message)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{record.where}: field 'messages' must end with an assistant message (the answer that is learned)"
            )
        prompt = render_chat(context, messages[:-1], add_generation_prompt=True)
        full = render_chat(context, messages, add_generation_prompt=False)
        reference = messages[-1]["content"]
    else:
        hint = " (causal-lm records need 'prompt' and 'completion', or 'messages')"
        user, reference = record.get("prompt", hint=hint), record.get("completion", hint=hint)
        if not context.chat_template:
            return user, reference + (context.tokenizer.eos_token or ""), reference
        prompt = prompt_text(context, user)
        full = render_chat(context, _chat(context, user, reference), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError(
            f"{record.where}: the chat template renders the conversation so that the prompt is not its beginning; use "
            "prompt/completion without chat_template"
        )
    return prompt, full[len(prompt) :], reference


def _check_message(record: Record, index: int, message: Any) -> None:
    """Refuse a chat message that is not an object with a string `role` and `content` (a null content
    would be rendered as the text 'None')."""
    where = f"{record.where} message {index}"
    if not isinstance(message, dict):
        raise DataError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
    for key in ("role", "content"):
        Record(message, where).get(key)


def _ids(context: EncodeContext, text: str, special: bool) -> list[int]:
    return context.tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_causal(record: Record, context: EncodeContext) -> dict[str, Any]:
    prompt, completion, reference = _lm_texts(record, context)
    prompt_ids = _ids(context, prompt, special=not (context.chat_template or "messages" in record.fields))
    completion_ids = _ids(context, completion, special=False)
    ids = (prompt_ids + completion_ids)[: context.max_length]
    if len(prompt_ids) >= len(ids):
        raise DataError(
            f"{record.where}: the prompt alone fills max_length={context.max_length} tokens; raise max_length or "
            "shorten the prompt"
        )
    if len(ids) < len(prompt_ids) + len(completion_ids):
        context.cut.add("completions", Cut(record.where, len(prompt_ids) + len(completion_ids)))
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "prompt_length": len(prompt_ids),
        "reference": reference,
    }


def encode_seq2seq(record: Record, context: EncodeContext) -> dict[str, Any]:
    hint = " (seq2seq-lm records need 'prompt' and 'completion')"
    source, target = record.get("prompt", hint=hint), record.get("completion", hint=hint)
    encoded = _input_within(context, record, source)
    labels = context.tokenizer(text_target=target)["input_ids"]
    if len(labels) > context.max_length:
        context.cut.add("completions", Cut(record.where, len(labels)))
        labels = context.tokenizer(text_target=target, truncation=True, max_length=context.max_length)["input_ids"]
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": labels,
        "reference": target,
    }


def _input_within(context: EncodeContext, record: Record, *texts: str | None) -> Any:
    """The encoding of `record`'s input `texts` within max_length; a cut one is logged as an input cut."""
    encoded, whole = tokenize_within(context.tokenizer, context.max_length, *texts)
    if whole is not None:
        context.cut.add("inputs", Cut(record.where, len(whole["input_ids"])))
    return encoded


def _label_keys(record: Record, label_field: LabelField) -> list[str]:
    """The label names `record` holds under `label_field` (its label, or its tags a word), as text. A
    null or empty one is refused: it is no label (a null tag, an empty CSV cell), not a class of its own."""
    if label_field.per_word:
        keys = [str(tag) for tag in record.get_items(label_field.name, LABEL_KINDS)]
    else:
        keys = [str(record.get(label_field.name, LABEL_KINDS))]
    blank = next((position for position, key in enumerate(keys) if not key.strip()), None)
    if blank is not None:
        at, what = (f" at position {blank}", "word") if label_field.per_word else ("", "record")
        raise DataError(
            f"{record.where}: field {label_field.name!r} holds an empty label{at}; give every {what} its label "
            "(an empty value is no label)"
        )
    return keys


def _label_id(record: Record, context: EncodeContext, key: str) -> int:
    if key not in context.label_ids:
        raise DataError(f"{record.where}: label {key!r} is not among the training labels {sorted(context.label_ids)}")
    return context.label_ids[key]


def encode_sequence_classification(record: Record, context: EncodeContext) -> dict[str, Any]:
    hint = " (seq-cls records need 'text' and 'label')"
    text = record.get("text", hint=hint)
    pair = record.get("text_pair") if record.fields.get("text_pair") is not None else None  # null: no pair
    encoded = _input_within(context, record, text, pair)
    [label_name] = _label_keys(record, SEQUENCE_LABEL)
    label = _label_id(record, context, label_name)
    return {**{key: list(value) for key, value in encoded.items()}, "labels": label}


def encode_token_classification(record: Record, context: EncodeContext) -> dict[str, Any]:
    words, tags = record.get_items("tokens", str), _label_keys(record, WORD_TAGS)
    if len(words) != len(tags):
        raise DataError(
            f"{record.where}: 'tokens' has {len(words)} words but 'tags' {len(tags)}; give one tag per word"
        )
    encoded, whole = tokenize_within(context.tokenizer, context.max_length, words, is_split_into_words=True)
    if whole is not None:
        lost = len(set(whole.word_ids()) - set(encoded.word_ids()))
        context.cut.add("words", Cut(record.where, len(whole["input_ids"]), words_lost=lost))
    labels, previous = [], None
    for word in encoded.word_ids():
        labels.append(IGNORE_INDEX if word is None or word == previous else _label_id(record, context, tags[word]))
        previous = word
    return {**{key: list(value) for key, value in encoded.items()}, "labels": labels}


WHOLE_NUMBERS: dict[type, Callable[[Any], int | None]] = {
    int: lambda value: value,
    float: lambda value: int(value) if value.is_integer() else None,
    str: lambda value: int(value) if value.strip().lstrip("-").isdecimal() else None,
}
"""Type → reader of a whole number from a value of it (None: not a whole number): `answer_start` as
JSON writes it, Arrow (a float column, as pandas stores integers beside a missing value) or CSV text."""


def _answer_start(record: Record, passage: str, answer: str) -> int:
    """Where the answer starts in the context: `answer_start`; where the record leaves it out (absent,
    null, or an empty cell), the answer's first occurrence."""
    value = record.fields.get("answer_start")
    if value is None or value == "":
        return passage.find(answer)
    reader = WHOLE_NUMBERS.get(type(value))
    start = reader(value) if reader is not None else None
    if start is None:
        raise DataError(
            f"{record.where}: field 'answer_start' must be a whole number (the answer's first character in the "
            f"context), got {type(value).__name__} {value!r}"
        )
    return start


Offsets = list[tuple[int, int] | None]
"""Each token's character range in the context; None for the question's and the special tokens."""


def _context_offsets(encoded: Any) -> Offsets:
    """The context offsets of a tokenized (question, context) pair, its `offset_mapping` taken out."""
    pairs = zip(encoded.pop("offset_mapping"), encoded.sequence_ids())
    return [tuple(offset) if sequence == 1 else None for offset, sequence in pairs]


def _covering(offsets: Offsets, first: int, end: int) -> list[int]:
    """The tokens whose characters overlap [first, end)."""
    return [index for index, offset in enumerate(offsets) if offset and offset[0] < end and offset[1] > first]


def _answer_span(
    record: Record, context: EncodeContext, offsets: Offsets, start_char: int, answer: str
) -> tuple[int, int]:
    """The first and last tokens of the answer's text, its surrounding spaces left out (they are no
    token's); (0, 0) for an empty answer (SQuAD 2.0's no answer). An answer that max_length cuts out of
    the context, whole or in part, is refused: trained as no answer, it would teach what evaluation
    never answers."""
    words = answer.strip()
    if not words:
        return 0, 0
    first = start_char + len(answer) - len(answer.lstrip())
    end = first + len(words)
    tokens = _covering(offsets, first, end)
    if tokens and offsets[tokens[-1]][1] >= end:
        return tokens[0], tokens[-1]
    pair = record.fields["question"], record.fields["context"]
    whole = _context_offsets(context.tokenizer(*pair, return_offsets_mapping=True))
    whole_tokens = _covering(whole, first, end)
    if not whole_tokens:
        raise DataError(f"{record.where}: the answer {answer!r} is no token of the context; give text of the context")
    if len(whole_tokens) == len(tokens):  # its last characters are no token's, and nothing of it was cut
        return tokens[0], tokens[-1]
    needed = whole_tokens[-1] + len(whole) - max(index for index, offset in enumerate(whole) if offset)
    raise DataError(
        f"{record.where}: the answer {answer!r} lies past max_length={context.max_length} (its tokens are "
        f"{whole_tokens[0] + 1}-{whole_tokens[-1] + 1} of the {len(whole)} that the question and the whole context "
        f"take); raise max_length to {needed} or shorten the context: an answer cut from the context cannot be learned"
    )


def encode_question_answering(record: Record, context: EncodeContext) -> dict[str, Any]:
    hint = " (qa records need 'question', 'context' and 'answer')"
    question, passage, answer = (
        record.get("question", hint=hint),
        record.get("context", hint=hint),
        record.get("answer", hint=hint),
    )
    start_char = _answer_start(record, passage, answer)
    if start_char < 0 or passage[start_char : start_char + len(answer)] != answer:
        raise DataError(f"{record.where}: the answer {answer!r} is not in the context (at answer_start={start_char})")
    encoded = context.tokenizer(
        question, passage, truncation="only_second", max_length=context.max_length, return_offsets_mapping=True
    )
    offsets = _context_offsets(encoded)
    start, end = _answer_span(record, context, offsets, start_char, answer)
    return {
        **{key: list(value) for key, value in encoded.items()},
        "start_positions": start,
        "end_positions": end,
        "offsets": offsets,
        "context": passage,
        "reference": answer,
    }


def encode_feature_extraction(record: Record, context: EncodeContext) -> dict[str, Any]:
    hint = " (feature-extraction records need 'text' and 'positive')"
    (text, whole_text), (positive, whole_positive) = (
        tokenize_within(context.tokenizer, context.max_length, record.get(name, hint=hint))
        for name in ("text", "positive")
    )
    wholes = [len(whole["input_ids"]) for whole in (whole_text, whole_positive) if whole is not None]
    if wholes:
        context.cut.add("inputs", Cut(record.where, max(wholes)))
    return {
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "positive_input_ids": positive["input_ids"],
        "positive_attention_mask": positive["attention_mask"],
    }


def label_names(label_field: LabelField | None, records: list[Record]) -> list[str]:
    """The label names found in `records` under `label_field`, sorted (numbers numerically); none for
    a task without one. A data set with a single label is refused."""
    if label_field is None:
        return []
    found: set[str] = set()
    for record in records:
        found.update(_label_keys(record, label_field))
    if len(found) == 1:
        raise DataError(
            f"the training data holds only one label, {found.pop()!r} (field {label_field.name!r}); classification "
            "needs at "
            "least two: add examples of the other labels"
        )
    return sorted(
        found, key=lambda name: (not name.lstrip("-").isdigit(), int(name) if name.lstrip("-").isdigit() else 0, name)
    )


PAD_VALUES = {"attention_mask": 0, "positive_attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
"""Padding of each batched field; token-id fields pad with the tokenizer's pad id."""


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the list fields to the longest in the batch and stack numbers; text fields (kept for
    evaluation) are left out."""
    batch = {}
    for key, first in features[0].items():
        if isinstance(first, list) and (not first or isinstance(first[0], int)):
            width = max(len(feature[key]) for feature in features)
            pad = PAD_VALUES.get(key, pad_id)
            batch[key] = torch.tensor([feature[key] + [pad] * (width - len(feature[key])) for feature in features])
        elif isinstance(first, int) and key != "prompt_length":
            batch[key] = torch.tensor([feature[key] for feature in features])
    return batch
