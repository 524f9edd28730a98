"""Generation evaluated once per prompt, against every reference of that prompt.

Data sets for text generation often hold one line per (input, human reference) pair, the input
repeated once per reference: the E2E NLG test set has 4,693 lines for 630 meaning representations
(MRs). The E2E challenge's scoring (`measure_scores.py` of tuetschek/e2e-metrics, which groups the
references of identical MRs, `read_and_group_tsv`) takes one system output per distinct MR and scores
it against all of that MR's references (see `metrics.py` for how BLEU and ROUGE-L use them). Scoring
each line alone instead generates every MR once per reference and judges each output against one of
its references: BLEU comes out lower (an n-gram of another reference counts as wrong), and an MR
weighs as much as it has references.

So the language-model tasks answer once per prompt (`once_per_prompt`): the examples are grouped by
the token ids the model generates from (its prompt; a seq2seq model's encoder input), in order of
first appearance; the task's predictor answers the first example of each group, and every example of
the group gets that answer (greedy decoding gives one answer per prompt). The metrics then compare one
prediction per group with the list of the group's references (`scored`). A set whose prompts are all
distinct scores as before; where some prompt repeats, the eval reports `references_per_prompt` (lines
per distinct prompt) beside the metrics, so a figure says how it was scored. The eval loss is not
grouped: teacher forcing runs on every line, each with its own reference (`evaluate.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .predict import Answers, Bar, EvalContext, Predictor

PromptKey = Callable[[dict[str, Any]], tuple[int, ...]]
"""An example's prompt as the model sees it: the token ids it generates from."""


def causal_prompt(feature: dict[str, Any]) -> tuple[int, ...]:
    """A causal LM's prompt: the ids before the completion."""
    return tuple(feature["input_ids"][: feature["prompt_length"]])


def encoder_input(feature: dict[str, Any]) -> tuple[int, ...]:
    """A seq2seq model's prompt: the encoder's input ids."""
    return tuple(feature["input_ids"])


def group_by_prompt(features: list[dict[str, Any]], key: PromptKey) -> list[list[int]]:
    """The indices of the examples of each distinct prompt, groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, feature in enumerate(features):
        groups.setdefault(key(feature), []).append(index)
    return list(groups.values())


def once_per_prompt(predictor: Predictor, key: PromptKey) -> Predictor:
    """`predictor` answering the first example of each prompt group only; every example gets its
    group's answer and keeps its own reference, and the groups ride along (`Answers.groups`). The
    progress bar advances by the examples so answered, the repeats at the end."""

    def predict(model: nn.Module, features: list[dict[str, Any]], context: EvalContext, bar: Bar) -> Answers:
        groups = group_by_prompt(features, key)
        answers = predictor(model, [features[group[0]] for group in groups], context, bar)
        bar.update(len(features) - len(groups))
        predictions: list[Any] = [None] * len(features)
        for group, prediction in zip(groups, answers.predictions):
            for index in group:
                predictions[index] = prediction
        return Answers(predictions, [feature["reference"] for feature in features], answers.loss, groups)

    return predict


def scored(answers: Answers) -> tuple[list, list]:
    """(predictions, references) as the metrics compare them: per prompt group, its one prediction and
    the list of its references; answers without groups as they are."""
    if answers.groups is None:
        return answers.predictions, answers.references
    predictions = [answers.predictions[group[0]] for group in answers.groups]
    return predictions, [[answers.references[index] for index in group] for group in answers.groups]


def grouping_report(answers: Answers) -> dict[str, float]:
    """{"references_per_prompt": examples per distinct prompt} when some prompt repeats; else nothing
    (every prompt scored against its one reference, as without grouping)."""
    if answers.groups is None or len(answers.groups) == len(answers.predictions):
        return {}
    return {"references_per_prompt": len(answers.predictions) / len(answers.groups)}
