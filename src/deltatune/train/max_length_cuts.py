"""What max_length cuts while a data set is encoded, and the one notice a kind of cut gets.

A record longer than `max_length` tokens loses its end. Which end, and what that costs, depends on the
task, so each kind has its own warning class (all `MaxLengthCutWarning`s, which a filter can silence at
once):

    completions  a causal-lm or seq2seq-lm completion: its end (and EOS) is not learned   CutCompletionsWarning
    inputs       a classification text or pair, a seq2seq source, an embedding text:      CutInputsWarning
                 the model never sees its end
    words        token classification: the words past max_length get no tag, so they are  CutWordsWarning
                 neither trained on nor scored

Each notice counts the records of one data set so cut, names the first, and gives the max_length that
keeps them all whole. An input is tokenized whole first (so its full length is known) and again with
truncation only when it does not fit: one tokenizer call for a record that fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CutCompletionsWarning, CutInputsWarning, CutWordsWarning


@dataclass(frozen=True)
class Cut:
    """One record max_length cut: where it is, the tokens it takes whole, and (token-cls) the words lost."""

    where: str
    whole_length: int
    words_lost: int = 0


def _completions_text(cuts: list[Cut], records: int, max_length: int) -> str:
    return (
        f"{len(cuts):,} of {records:,} records are longer than max_length={max_length} tokens (the first: "
        f"{cuts[0].where}), so max_length cut their completions: their ends are not trained on (nor counted in the "
        f"eval loss); raise max_length to {_longest(cuts)} to keep them whole"
    )


def _inputs_text(cuts: list[Cut], records: int, max_length: int) -> str:
    return (
        f"{len(cuts):,} of {records:,} records have a text longer than max_length={max_length} tokens (the first: "
        f"{cuts[0].where}), so max_length cut its end: the model never sees it, in training or evaluation; raise "
        f"max_length to {_longest(cuts)} to keep them whole"
    )


def _words_text(cuts: list[Cut], records: int, max_length: int) -> str:
    return (
        f"{len(cuts):,} of {records:,} records are longer than max_length={max_length} tokens (the first: "
        f"{cuts[0].where}): max_length cut {sum(cut.words_lost for cut in cuts):,} of their words, which are neither "
        f"trained on nor scored; raise max_length to {_longest(cuts)} to keep them whole"
    )


def _longest(cuts: list[Cut]) -> int:
    return max(cut.whole_length for cut in cuts)


NOTICES: dict[str, tuple[type[Warning], Callable[[list[Cut], int, int], str]]] = {
    "completions": (CutCompletionsWarning, _completions_text),
    "inputs": (CutInputsWarning, _inputs_text),
    "words": (CutWordsWarning, _words_text),
}
"""Kind of cut → (its warning class, the text of its notice from (cuts, records, max_length))."""


@dataclass
class CutLog:
    """The records of one data set that max_length cut, by kind (a key of `NOTICES`)."""

    cuts: dict[str, list[Cut]] = field(default_factory=dict)

    def add(self, kind: str, cut: Cut) -> None:
        self.cuts.setdefault(kind, []).append(cut)

    def warn(self, records: int, max_length: int) -> None:
        """One notice a kind of cut, for a data set of `records` records (pointing at the encoder's caller)."""
        for kind, cuts in self.cuts.items():
            category, text = NOTICES[kind]
            warnings.warn(text(cuts, records, max_length), category, stacklevel=3)


def tokenize_within(tokenizer: Any, max_length: int, *texts: str | None, **options: Any) -> tuple[Any, Any | None]:
    """(the encoding of `texts` within max_length tokens, the whole encoding where it did not fit, else
    None). The whole is tokenized without transformers' notice about lengths past the model's own limit."""
    whole = tokenizer(*texts, verbose=False, **options)
    if len(whole["input_ids"]) <= max_length:
        return whole, None
    return tokenizer(*texts, truncation=True, max_length=max_length, **options), whole
