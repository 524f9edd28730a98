"""Task types: one row per task holds everything the trainer knows about it (DESIGN.md §2).

| task               | model class             | trains fully | loss                 | metrics (main first)       |
|--------------------|-------------------------|--------------|----------------------|----------------------------|
| causal-lm          | AutoModelForCausalLM    | none         | causal_lm_batch_loss | exact_match, bleu, rouge_l |
| seq2seq-lm         | AutoModelForSeq2SeqLM   | none         | seq2seq_lm_loss      | exact_match, bleu, rouge_l |
| seq-cls            | …SequenceClassification | classifier   | the model's own      | accuracy, macro f1         |
| token-cls          | …TokenClassification    | classifier   | the model's own      | accuracy, macro f1         |
| qa                 | …QuestionAnswering      | qa_outputs   | the model's own      | exact_match, token f1      |
| feature-extraction | AutoModel               | none         | contrastive_loss     | accuracy                   |

Language models are judged on their generations (one per distinct prompt, against all of its
references: `prompt_groups.py`), classifiers on the arg-max label (tag), QA on
the best span, embeddings on whether each text's nearest positive is its own. Evaluation reads the
eval set once for the last four rows (one forward gives the loss and the answer) and twice for
language models (a teacher-forced loss pass, then the generation; `loss_terms`).

The rows live in `train/` because they hold the trainer's encoders and predictors by direct
reference; the losses they name are the core library's (`deltatune.losses`, used without the trainer
too). So the import runs one way: `train.tasks` imports `losses`, `encode`, `predict`, `prompt_groups`
and `metrics`, none of which imports it back, and `import deltatune` never imports `train/`. A task is one row
here and nothing else; a name with no row is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..losses import causal_lm_batch_loss, contrastive_loss, model_loss, seq2seq_lm_loss, unwrap
from ..task_record import head_children
from . import encode, metrics, predict, prompt_groups
from .data import Record
from .max_length_cuts import CutLog

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Encoder = Callable[[Record, encode.EncodeContext], dict[str, Any]]
Metric = Callable[[list, list], float]


@dataclass(frozen=True)
class TaskType:
    """What a task needs from the model, how its records become examples, and how it is judged."""

    name: str
    model_class: str
    """Name of the transformers auto class that loads the model."""
    loss: Loss
    """The training (and eval) loss of a collated batch."""
    encoder: Encoder
    """One record → one example's fields (`encode.py`)."""
    predictor: predict.Predictor
    """The model's answers on examples, next to the references, and the eval loss where the same
    forward gives it (`predict.py`)."""
    metrics: dict[str, Metric]
    """The metrics evaluation reports, each comparing predictions with references; the first is the
    main one."""
    label_field: encode.LabelField | None = None
    """Where the records hold label names (classification), mapped to ids in sorted order."""
    trains_head: bool = False
    """Whether the model's task head is new and must train fully (`trained_heads`)."""
    loss_terms: Callable[[dict[str, torch.Tensor]], int] | None = None
    """Language models: how many terms (labelled tokens) `loss` of a batch is the mean of. Evaluation
    then makes a teacher-forced pass with `loss` before the predictor generates, weighting each batch by
    its terms. None: the predictor's own forward gives the eval loss, in one pass (`evaluate.py`)."""

    @property
    def main_metric(self) -> str:
        return next(iter(self.metrics))

    def auto_class(self) -> Any:
        """The transformers auto class that loads this task's model."""
        import transformers

        return getattr(transformers, self.model_class)

    def encode(self, records: list[Record], context: encode.EncodeContext) -> list[dict[str, Any]]:
        """The examples of a data set's records; one notice a kind counts those max_length cut."""
        context = dataclasses.replace(context, cut=CutLog())
        features = [self.encoder(record, context) for record in records]
        context.cut.warn(len(records), context.max_length)
        return features


def trained_heads(model: nn.Module) -> list[str]:
    """The head modules a task model adds on top of its backbone (`classifier`, `score`,
    `qa_outputs`): children with parameters other than the backbone. They start untrained, so they
    train fully (`modules_to_save`)."""
    return head_children(unwrap(model))


TEXT_METRICS = {"exact_match": metrics.exact_match_any, "bleu": metrics.bleu, "rouge_l": metrics.rouge_l}
"""Generation metrics: each prediction against the list of its prompt's references."""
LABEL_METRICS = {"accuracy": metrics.accuracy, "f1": metrics.macro_f1}

TASKS: dict[str, TaskType] = {
    task.name: task
    for task in (
        TaskType(
            "causal-lm",
            "AutoModelForCausalLM",
            causal_lm_batch_loss,
            encode.encode_causal,
            prompt_groups.once_per_prompt(predict.predict_causal, prompt_groups.causal_prompt),
            TEXT_METRICS,
            loss_terms=predict.next_token_targets,
        ),
        TaskType(
            "seq2seq-lm",
            "AutoModelForSeq2SeqLM",
            seq2seq_lm_loss,
            encode.encode_seq2seq,
            prompt_groups.once_per_prompt(predict.predict_seq2seq, prompt_groups.encoder_input),
            TEXT_METRICS,
            loss_terms=predict.labelled_tokens,
        ),
        TaskType(
            "seq-cls",
            "AutoModelForSequenceClassification",
            model_loss,
            encode.encode_sequence_classification,
            predict.predict_labels,
            LABEL_METRICS,
            label_field=encode.SEQUENCE_LABEL,
            trains_head=True,
        ),
        TaskType(
            "token-cls",
            "AutoModelForTokenClassification",
            model_loss,
            encode.encode_token_classification,
            predict.predict_labels,
            LABEL_METRICS,
            label_field=encode.WORD_TAGS,
            trains_head=True,
        ),
        TaskType(
            "qa",
            "AutoModelForQuestionAnswering",
            model_loss,
            encode.encode_question_answering,
            predict.predict_spans,
            {"exact_match": metrics.exact_match, "f1": metrics.token_f1},
            trains_head=True,
        ),
        TaskType(
            "feature-extraction",
            "AutoModel",
            contrastive_loss,
            encode.encode_feature_extraction,
            predict.predict_nearest,
            {"accuracy": metrics.accuracy},
        ),
    )
}


def get_task(name: str) -> TaskType:
    """The task type called `name`; the error lists the known ones."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), TASKS, n=2)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise DeltaTuneError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}")
