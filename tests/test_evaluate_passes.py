"""Evaluation reads each example once per pass: a classifier's loss and predictions come from one
forward per length-grouped batch and equal the plain two-pass computation (the loss over batches in
file order, then the predictions); a language model makes one teacher-forced loss pass and one
generation. The eval loss is the mean over its terms in the whole set (examples, or labelled tokens),
whatever the batching; a progress bar counts the examples."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForTokenClassification

import deltatune
from deltatune.losses import CONTRASTIVE_SCALE, embed
from deltatune.train.config import TrainConfig
from deltatune.train.encode import collate
from deltatune.train.evaluate import evaluate
from deltatune.train.loop import prepare_run
from deltatune.train.predict import EvalContext
from deltatune.train.tasks import get_task
from tiny_models import VOCAB, bert
from training_fixtures import WORDS, task_config, write_jsonl

CONTEXT = SimpleNamespace(pad_token_id=0)


def classification_features(count: int, seed: int = 0, per_token: bool = False) -> list[dict]:
    """`count` examples of 2 to 24 tokens, in no order of length, with labels 0-2 (per token: the first
    token unlabelled)."""
    rng = random.Random(seed)
    features = []
    for _ in range(count):
        length = rng.randint(2, 24)
        labels = [-100] + [rng.randrange(3) for _ in range(length - 1)] if per_token else rng.randrange(3)
        features.append(
            {
                "input_ids": [rng.randrange(3, VOCAB) for _ in range(length)],
                "attention_mask": [1] * length,
                "labels": labels,
            }
        )
    return features


def varied_records(task: str, count: int = 14, seed: int = 0) -> list[dict]:
    """Records of 1 to 9 words per field, in no order of length (so grouping by length reorders them)."""
    rng = random.Random(seed)

    def words() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 9)))

    fields = {"causal-lm": ("prompt", "completion"), "feature-extraction": ("text", "positive")}[task]
    return [{name: words() for name in fields} for _ in range(count)]


def varied_run(tmp_path, task: str):
    """A prepared tiny `task` run evaluating `varied_records`, 5 to a batch, its model in eval mode."""
    eval_file = write_jsonl(tmp_path / "varied.jsonl", varied_records(task))
    run = prepare_run(
        TrainConfig.from_yaml(task_config(tmp_path, task), [f"eval_file={eval_file}", "eval_batch_size=5"])
    )
    assert len({len(feature["input_ids"]) for feature in run.eval_features}) > 3
    run.delta_model.eval()
    return run


def adapted(model: torch.nn.Module) -> deltatune.DeltaModel:
    """`model` with a LoRA whose factors are random (so the adapter changes the outputs)."""
    delta_model = deltatune.attach(model, deltatune.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.normal_(0, 0.2)
    return delta_model.eval()


def forward_inputs(module: torch.nn.Module) -> list[torch.Size]:
    """The shape of `input_ids` of every forward of `module` from now on."""
    shapes = []
    module.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
    return shapes


def context(batch_size: int) -> EvalContext:
    return EvalContext(CONTEXT, torch.device("cpu"), batch_size, max_new_tokens=4)


@torch.no_grad()
def two_pass_reference(model: torch.nn.Module, features: list[dict], batch_size: int) -> dict:
    """Evaluation as it was: the mean of the batch losses over batches in file order, then a second
    pass for the arg-max labels."""
    batches = [collate(features[start : start + batch_size], 0) for start in range(0, len(features), batch_size)]
    losses = [model(**batch).loss.item() for batch in batches]
    predictions, references = [], []
    for batch in batches:
        labels = batch.pop("labels")
        predictions += model(**batch).logits.argmax(-1).tolist()
        references += labels.tolist()
    accuracy = sum(p == r for p, r in zip(predictions, references)) / len(references)
    return {"loss": sum(losses) / len(losses), "accuracy": accuracy, "predictions": predictions}


@torch.no_grad()
def one_at_a_time(model: torch.nn.Module, features: list[dict]) -> list[tuple[float, int]]:
    """(the model's own loss, its number of labelled terms) of each example alone: no padding, no batch."""
    results = []
    for feature in features:
        batch = collate([feature], 0)
        labels = batch["labels"]
        results.append((model(**batch).loss.item(), int((labels != -100).sum())))
    return results


def test_evaluating_2000_examples_is_one_forward_over_them_equal_to_the_two_pass_result(capsys) -> None:
    model = bert()
    delta_model = adapted(model)
    features = classification_features(2000)
    expected = two_pass_reference(delta_model, features, batch_size=16)
    forwards = forward_inputs(model)
    result = evaluate(delta_model, get_task("seq-cls"), features, context(16))
    assert len(forwards) == 2000 // 16 and sum(shape[0] for shape in forwards) == 2000
    assert result.predictions == expected["predictions"]
    assert result.metrics["accuracy"] == expected["accuracy"]
    assert result.metrics["loss"] == pytest.approx(expected["loss"], abs=1e-6, rel=0)
    shown = capsys.readouterr().err
    assert "eval" in shown and "/2000" in shown and "example/s" in shown


def test_no_progress_bar_without_progress(capsys) -> None:
    evaluate(adapted(bert()), get_task("seq-cls"), classification_features(40), context(16), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("batch_size", [1, 7, 50])
def test_a_classifier_eval_loss_is_the_mean_over_examples_whatever_the_batch_size(batch_size: int) -> None:
    delta_model = adapted(bert())
    features = classification_features(50, seed=1)
    alone = one_at_a_time(delta_model, features)
    result = evaluate(delta_model, get_task("seq-cls"), features, context(batch_size), progress=False)
    assert result.metrics["loss"] == pytest.approx(sum(loss for loss, _ in alone) / len(alone), abs=1e-6, rel=0)


def test_the_old_mean_of_batch_means_weighs_a_short_last_batch_wrongly() -> None:
    """Why the loss is summed over terms: 50 examples in batches of 16 leave a last batch of 2, which the
    mean of batch means counted as much as a batch of 16."""
    delta_model = adapted(bert())
    features = classification_features(50, seed=1)
    alone = one_at_a_time(delta_model, features)
    per_example = sum(loss for loss, _ in alone) / len(alone)
    assert two_pass_reference(delta_model, features, 16)["loss"] != pytest.approx(per_example, abs=1e-4)
    result = evaluate(delta_model, get_task("seq-cls"), features, context(16), progress=False)
    assert result.metrics["loss"] == pytest.approx(per_example, abs=1e-6, rel=0)


def test_a_token_classifier_eval_loss_is_the_mean_over_labelled_tokens() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    delta_model = adapted(BertForTokenClassification(config))
    features = classification_features(30, seed=2, per_token=True)
    alone = one_at_a_time(delta_model, features)
    expected = sum(loss * terms for loss, terms in alone) / sum(terms for _, terms in alone)
    result = evaluate(delta_model, get_task("token-cls"), features, context(8), progress=False)
    assert result.metrics["loss"] == pytest.approx(expected, abs=1e-6, rel=0)
    tags = [label for feature in features for label in feature["labels"] if label != -100]
    assert result.references == tags and len(result.predictions) == len(tags)


def test_a_causal_lm_makes_one_loss_pass_and_one_generation_and_answers_in_the_data_order(tmp_path) -> None:
    run = varied_run(tmp_path, "causal-lm")
    model, features = run.delta_model, run.eval_features
    forwards = forward_inputs(model.base_model)
    result = run.evaluate(progress=False)
    full = [shape for shape in forwards if shape[1] > 1]  # the loss pass and each generation's first step
    assert sum(shape[0] for shape in full) == 2 * len(features)
    with torch.no_grad():
        alone = []
        for feature in features:
            ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
            alone.append((model(input_ids=ids, labels=labels).loss.item(), int((labels[:, 1:] != -100).sum())))
        prompts = [torch.tensor([f["input_ids"][: f["prompt_length"]]]) for f in features]
        answers = [
            model.generate(input_ids=p, max_new_tokens=run.config.max_new_tokens, do_sample=False, pad_token_id=0)
            for p in prompts
        ]
    expected_loss = sum(loss * terms for loss, terms in alone) / sum(terms for _, terms in alone)
    assert result.metrics["loss"] == pytest.approx(expected_loss, abs=1e-5, rel=0)
    texts = [
        run.tokenizer.decode(a[0, p.shape[1] :], skip_special_tokens=True).strip() for a, p in zip(answers, prompts)
    ]
    assert result.predictions == texts
    assert result.references == [feature["reference"] for feature in features]


def test_an_embedding_eval_is_one_pass_and_its_loss_is_the_contrastive_loss_over_the_whole_set(tmp_path) -> None:
    run = varied_run(tmp_path, "feature-extraction")
    model, features = run.delta_model, run.eval_features
    forwards = forward_inputs(model.base_model)
    result = run.evaluate(progress=False)
    assert sum(shape[0] for shape in forwards) == 2 * len(features)  # each text and each positive once
    with torch.no_grad():

        def alone(ids_key: str, mask_key: str) -> torch.Tensor:
            return torch.cat([embed(model, torch.tensor([f[ids_key]]), torch.tensor([f[mask_key]])) for f in features])

        scores = alone("input_ids", "attention_mask") @ alone("positive_input_ids", "positive_attention_mask").t()
    expected = F.cross_entropy(CONTRASTIVE_SCALE * scores, torch.arange(len(features)))
    assert result.metrics["loss"] == pytest.approx(float(expected), abs=1e-5, rel=0)
    assert result.predictions == scores.argmax(-1).tolist()
