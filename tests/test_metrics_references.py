"""The generation metrics score each prediction against every reference of its prompt, as the references'
own libraries do when called directly with the multi-reference layout: BLEU is sacrebleu's corpus BLEU
over reference streams (None where a prediction has fewer references), ROUGE-L the mean over predictions
of the best rouge-score F-measure over its references, and exact match counts a prediction equal to any
of its references. With one reference each they are the single-reference scores."""

from __future__ import annotations

import pytest

from deltatune.train import metrics

pytestmark = pytest.mark.transformers_independent  # sacrebleu and rouge-score on strings

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is not installed (pip install 'deltatune[metrics]')")
rouge_scorer = pytest.importorskip(
    "rouge_score.rouge_scorer", reason="rouge-score is not installed (pip install 'deltatune[metrics]')"
)

PREDICTIONS = [
    "the cat sat on the mat .",
    "a red dog runs in the park near the river",
    "there is a blue bird",
    "Hello there",
]
REFERENCE_SETS = [
    ["on the mat sat the cat .", "the cat sat on a mat .", "a cat is sitting on the mat ."],
    ["a red dog runs in a park by the river"],
    ["a blue bird is there", "there is a bird that is blue"],
    ["hello there", "Hello"],
]
STREAMS = [
    ["on the mat sat the cat .", "a red dog runs in a park by the river", "a blue bird is there", "hello there"],
    ["the cat sat on a mat .", None, "there is a bird that is blue", "Hello"],
    ["a cat is sitting on the mat .", None, None, None],
]
"""REFERENCE_SETS in sacrebleu's layout, written out: stream k holds the k-th reference of each prediction."""


def test_bleu_with_several_references_is_sacrebleus_multi_reference_corpus_bleu() -> None:
    expected = sacrebleu.corpus_bleu(PREDICTIONS, STREAMS).score / 100
    assert metrics.bleu(PREDICTIONS, REFERENCE_SETS) == pytest.approx(expected, abs=1e-12)
    first_only = sacrebleu.corpus_bleu(PREDICTIONS, [STREAMS[0]]).score / 100
    assert expected > first_only + 0.01  # the other references count: another n-gram is not an error


def test_bleu_with_one_reference_each_is_sacrebleus_single_reference_corpus_bleu() -> None:
    references = [references[0] for references in REFERENCE_SETS]
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [references]).score / 100
    assert metrics.bleu(PREDICTIONS, [[reference] for reference in references]) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_is_the_mean_over_predictions_of_the_best_f_over_their_references() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    best = [
        max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)
        for prediction, references in zip(PREDICTIONS, REFERENCE_SETS)
    ]
    assert metrics.rouge_l(PREDICTIONS, REFERENCE_SETS) == pytest.approx(sum(best) / len(best), abs=1e-12)
    first_only = [scorer.score(refs[0], p)["rougeL"].fmeasure for p, refs in zip(PREDICTIONS, REFERENCE_SETS)]
    assert sum(best) > sum(first_only)


def test_exact_match_counts_a_prediction_equal_to_any_of_its_own_references() -> None:
    predictions = ["yes ", "no", "maybe", "blue"]
    reference_sets = [["no", " yes"], ["no"], ["perhaps", "no"], ["maybe"]]
    assert metrics.exact_match_any(predictions, reference_sets) == 2 / 4  # "maybe" is another prompt's reference
    assert metrics.exact_match_any(["no"], [["yes", "maybe"]]) == 0.0
