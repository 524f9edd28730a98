"""Evaluation metrics, each a number in [0, 1].

- accuracy: share of predictions equal to the reference.
- f1 (classification): macro F1, the mean over labels of 2·P·R / (P + R).
- exact_match (question answering): share of predictions equal to the reference after stripping
  surrounding spaces.
- f1 (question answering): SQuAD's token-overlap F1 between predicted and reference answer, averaged.

Generated text is scored against every reference of its prompt (`prompt_groups.py`): each prediction
comes with a list of one or more references.

- exact_match (generation): share of predictions equal to any of their references (spaces stripped).
- bleu: corpus BLEU (Papineni et al. 2002) by sacrebleu (13a tokens, cased), divided by 100, with
  every reference: an n-gram's count is clipped at its most in any one reference, and the brevity
  penalty uses, per prediction, the reference length closest to its own (the shorter on a tie). That
  is the multi-reference BLEU of mteval-v13a, which the E2E NLG challenge's `measure_scores.py`
  (tuetschek/e2e-metrics) runs, as its Python port `pymteval.BLEUScore` does; both lower-case first,
  so E2E's official BLEU is sacrebleu's with `lowercase=True`, and ours (cased) differs from it where
  case differs.
- rouge_l: the mean over predictions of the best ROUGE-L F-measure (Lin 2004, longest common
  subsequence) over its references, rouge-score's `score_multi`. E2E's script uses COCO's ROUGE-L
  instead (`pycocoevalcap/rouge/rouge.py`): the best precision and the best recall over the references,
  each possibly from another one, in an F with β = 1.2, on its own tokens; the two are not equal.
BLEU and ROUGE-L need the optional packages `sacrebleu` and `rouge-score` (`pip install deltatune[metrics]`).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from ..errors import DeltaTuneError


def accuracy(predictions: Sequence, references: Sequence) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def macro_f1(predictions: Sequence, references: Sequence) -> float:
    labels = sorted(set(references) | set(predictions), key=str)
    scores = []
    for label in labels:
        true_positive = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return accuracy([p.strip() for p in predictions], [r.strip() for r in references])


def exact_match_any(predictions: Sequence[str], reference_sets: Sequence[Sequence[str]]) -> float:
    """Share of predictions equal to one of their references, surrounding spaces stripped."""
    hits = sum(p.strip() in {r.strip() for r in references} for p, references in zip(predictions, reference_sets))
    return hits / max(len(reference_sets), 1)


def _answer_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    scores = []
    for prediction, reference in zip(predictions, references):
        predicted, expected = _answer_tokens(prediction), _answer_tokens(reference)
        common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
        if not predicted or not expected:
            scores.append(float(predicted == expected))
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(predicted), common / len(expected)
            scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / max(len(scores), 1)


def reference_streams(reference_sets: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout of several references: stream k holds each prediction's k-th reference, None
    where it has fewer (sacrebleu leaves None out; an empty string would count as a reference)."""
    count = max((len(references) for references in reference_sets), default=0)
    return [[references[k] if k < len(references) else None for references in reference_sets] for k in range(count)]


def bleu(predictions: Sequence[str], reference_sets: Sequence[Sequence[str]]) -> float:
    try:
        import sacrebleu
    except ImportError:
        raise DeltaTuneError("the BLEU metric needs sacrebleu: pip install 'deltatune[metrics]'") from None
    return min(1.0, sacrebleu.corpus_bleu(list(predictions), reference_streams(reference_sets)).score / 100.0)


def rouge_l(predictions: Sequence[str], reference_sets: Sequence[Sequence[str]]) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise DeltaTuneError("the ROUGE-L metric needs rouge-score: pip install 'deltatune[metrics]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score_multi(list(r), p)["rougeL"].fmeasure for p, r in zip(predictions, reference_sets)]
    return sum(scores) / max(len(scores), 1)


def available(name: str) -> bool:
    """Whether metric `name` can run here (BLEU and ROUGE-L need optional packages)."""
    import importlib.util

    package = {"bleu": "sacrebleu", "rouge_l": "rouge_score"}.get(name)
    return package is None or importlib.util.find_spec(package) is not None
