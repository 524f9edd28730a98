"""Generation eval on a file whose prompts repeat, one line per reference (E2E NLG's layout, written
here as a tiny `||` text file: 3 meaning representations with 2-3 references, one of them out of
order): the model generates once per distinct prompt, each output is the model's own greedy answer to
that prompt alone (transformers' `generate`, no batch), and BLEU, ROUGE-L and exact match score it
against all of that prompt's references, equal to sacrebleu / rouge-score called directly with the
multi-reference layout. The eval loss still covers every line, the predictions and references stay
one per line, and the eval reports `references_per_prompt`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.train.cli import main
from deltatune.train.config import TrainConfig
from deltatune.train.loop import prepare_run
from training_fixtures import model_folder, task_config

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is not installed (pip install 'deltatune[metrics]')")
rouge_scorer = pytest.importorskip(
    "rouge_score.rouge_scorer", reason="rouge-score is not installed (pip install 'deltatune[metrics]')"
)

MEANINGS = ["animal cat | color red", "animal dog | color blue | city paris", "animal fish | city rome"]
ORDER = [0, 0, 1, 2, 1, 2, 0]
"""The meaning representation of each line: MR 0 has three references, its last after the others."""
NEW_TOKENS = 6
TEXT_SETTINGS = {"separator": "||", "header": False, "column_names": ["prompt", "completion"]}


@torch.no_grad()
def greedy_answers(folder, prompts: list[str]) -> list[str]:
    """Each prompt's greedy continuation by the base model loaded with transformers, one prompt at a time."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        output = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        answers.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def reference_sets(answers: list[str]) -> list[list[str]]:
    """References for each MR in the order of its lines: MR 0's last one is the model's own answer (an
    exact match), the others share some of its words, or none."""
    shared = [" ".join(answer.split()[:-1] + ["cat", "is", "red"]) for answer in answers]
    return [[shared[0], "the cat is red", answers[0]], [shared[1], "a dog in paris"], ["the fish", shared[2]]]


def e2e_file(path, answers: list[str]):
    """The E2E-style file: `MR||reference` a line, lines in ORDER."""
    sets, taken = reference_sets(answers), [0, 0, 0]
    lines = []
    for meaning in ORDER:
        lines.append(f"{MEANINGS[meaning]}||{sets[meaning][taken[meaning]]} ")
        taken[meaning] += 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def grouped_run(tmp_path, monkeypatch):
    """(a prepared tiny causal-LM run evaluating the E2E-style file, the model's answer to each MR, the
    prompt ids of every generation the eval asks for)."""
    folder = model_folder(tmp_path, "causal-lm")
    answers = greedy_answers(folder, MEANINGS)
    assert all(answers), "the tiny model answers every prompt with some text"
    eval_file = e2e_file(tmp_path / "e2e.txt", answers)
    settings = {"eval_file": eval_file, "max_new_tokens": NEW_TOKENS, "eval_batch_size": 2, **TEXT_SETTINGS}
    run = prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", **settings)))
    asked: list[list[int]] = []
    generate = run.delta_model.generate

    def counted(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        asked.extend(row[keep.bool()].tolist() for row, keep in zip(ids, mask))
        return generate(*args, **kwargs)

    monkeypatch.setattr(run.delta_model, "generate", counted)
    return run, answers, asked


def test_the_model_generates_once_per_distinct_prompt_and_each_line_gets_its_prompts_answer(
    tmp_path, monkeypatch
) -> None:
    run, answers, asked = grouped_run(tmp_path, monkeypatch)
    result = run.evaluate(progress=False)
    prompts = [feature["input_ids"][: feature["prompt_length"]] for feature in run.eval_features]
    assert len(run.eval_features) == len(ORDER) and len(asked) == len(MEANINGS)
    assert sorted(asked) == sorted({tuple(prompt): prompt for prompt in prompts}.values())
    assert result.predictions == [answers[meaning] for meaning in ORDER]
    lines = Path(run.config.eval_file).read_text(encoding="utf-8").splitlines()
    assert result.references == [line.split("||")[1].strip() for line in lines]
    assert result.metrics["references_per_prompt"] == pytest.approx(len(ORDER) / len(MEANINGS))


def test_bleu_rouge_l_and_exact_match_score_each_answer_against_all_its_references(tmp_path, monkeypatch) -> None:
    run, answers, _ = grouped_run(tmp_path, monkeypatch)
    result = run.evaluate(progress=False)
    sets = reference_sets(answers)
    streams = [[references[k] if k < len(references) else None for references in sets] for k in range(3)]
    expected_bleu = sacrebleu.corpus_bleu(answers, streams).score / 100
    per_line = sacrebleu.corpus_bleu([answers[m] for m in ORDER], [result.references]).score / 100
    assert result.metrics["bleu"] == pytest.approx(expected_bleu, abs=1e-12) and expected_bleu > per_line
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    best = [max(scorer.score(r, answer)["rougeL"].fmeasure for r in refs) for answer, refs in zip(answers, sets)]
    assert result.metrics["rouge_l"] == pytest.approx(sum(best) / len(best), abs=1e-12)
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)  # MR 0's answer is one of its references


def test_the_eval_loss_still_covers_every_line_with_its_own_reference(tmp_path, monkeypatch) -> None:
    run, _, _ = grouped_run(tmp_path, monkeypatch)
    result = run.evaluate(progress=False)
    with torch.no_grad():
        alone = []
        for feature in run.eval_features:
            ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
            alone.append(
                (run.delta_model(input_ids=ids, labels=labels).loss.item(), int((labels[:, 1:] != -100).sum()))
            )
    expected = sum(loss * terms for loss, terms in alone) / sum(terms for _, terms in alone)
    assert len(alone) == len(ORDER) and result.metrics["loss"] == pytest.approx(expected, abs=1e-5, rel=0)


def test_distinct_prompts_score_against_their_one_reference_and_report_no_grouping(tmp_path) -> None:
    lines = [f"{meaning}||the {word} is here" for meaning, word in zip(MEANINGS, ["cat", "dog", "fish"])]
    (tmp_path / "distinct.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = {"eval_file": tmp_path / "distinct.txt", "max_new_tokens": NEW_TOKENS, **TEXT_SETTINGS}
    run = prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", **settings)))
    result = run.evaluate(progress=False)
    expected = sacrebleu.corpus_bleu(result.predictions, [result.references]).score / 100
    assert result.metrics["bleu"] == pytest.approx(expected, abs=1e-12)
    assert "references_per_prompt" not in result.metrics


def test_a_seq2seq_model_generates_once_per_distinct_encoder_input(tmp_path, monkeypatch) -> None:
    eval_file = e2e_file(tmp_path / "e2e.txt", ["red cat", "blue dog", "fish"])
    settings = {"eval_file": eval_file, "max_new_tokens": NEW_TOKENS, **TEXT_SETTINGS}
    run = prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "seq2seq-lm", **settings)))
    rows: list[int] = []
    generate = run.delta_model.generate
    monkeypatch.setattr(
        run.delta_model, "generate", lambda **kwargs: rows.append(len(kwargs["input_ids"])) or generate(**kwargs)
    )
    result = run.evaluate(progress=False)
    assert sum(rows) == len(MEANINGS) and len(result.predictions) == len(ORDER)
    assert result.metrics["references_per_prompt"] == pytest.approx(len(ORDER) / len(MEANINGS))


def test_a_run_trains_on_an_e2e_style_file_and_records_how_its_eval_was_scored(tmp_path) -> None:
    data = e2e_file(tmp_path / "e2e.txt", ["red cat", "blue dog", "fish"])
    config = task_config(tmp_path, "causal-lm", train_file=data, eval_file=data, **TEXT_SETTINGS)
    assert main(["train", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert report["eval"]["references_per_prompt"] == pytest.approx(len(ORDER) / len(MEANINGS))
    assert {"loss", "exact_match", "bleu", "rouge_l"} <= set(report["eval"])
