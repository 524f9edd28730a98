"""Evaluation metrics, each a number in [0, 1].

- accuracy: share of predictions equal to the reference.
- f1 (classification): macro F1, the mean over labels of 2·P·R / (P + R).
- exact_match (text): share of predictions equal to the reference after stripping surrounding spaces.
- f1 (question answering): SQuAD's token-overlap F1 between predicted and reference answer, averaged.
- bleu: corpus BLEU (Papineni et al. 2002) by sacrebleu, divided by 100.
- rouge_l: mean ROUGE-L F-measure (Lin 2004, longest common subsequence) by rouge-score.
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


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    try:
        import sacrebleu
    except ImportError:
        raise DeltaTuneError("the BLEU metric needs sacrebleu: pip install 'deltatune[metrics]'") from None
    return min(1.0, sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise DeltaTuneError("the ROUGE-L metric needs rouge-score: pip install 'deltatune[metrics]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def available(name: str) -> bool:
    """Whether metric `name` can run here (BLEU and ROUGE-L need optional packages)."""
    import importlib.util

    package = {"bleu": "sacrebleu", "rouge_l": "rouge_score"}.get(name)
    return package is None or importlib.util.find_spec(package) is not None
