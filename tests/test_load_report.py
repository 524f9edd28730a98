"""A task model loaded from a plain encoder folder says its new head in one plain line instead of
transformers' load report (`deltatune.train.load_report`), on both transformers lines; weights missing
outside the head still warn by name; a folder that holds its head, `--quiet`, and an adapter that holds
the head print nothing. Where a test relies on what transformers itself reports, a plain `from_pretrained`
of the same folder is its reference."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM, BertForPreTraining

import deltatune
from deltatune.errors import RandomWeightsWarning
from deltatune.train import TrainConfig, prepare_run
from deltatune.train.cli import main
from deltatune.train.load_report import REPORT_LOGGER, held_load_report
from deltatune.train.models import load_model
from deltatune.train.tasks import get_task
from training_fixtures import model_folder, task_config, word_tokenizer

REPORT_WORDS = ("LOAD REPORT", "MISSING", "were not initialized", "TRAIN this model")
"""What transformers' load report says (5.x table, 4.x warning); none of it may reach the user."""


@pytest.fixture
def transformers_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that sees transformers' records once: its library logger does not propagate to the root, unless
    a library loaded earlier in the process turned propagation on (then caplog's root handler would get each
    record a second time), so propagation is off for the test and restored after."""
    library = logging.getLogger("transformers")
    propagate = library.propagate
    library.propagate = False
    library.addHandler(caplog.handler)
    yield caplog
    library.removeHandler(caplog.handler)
    library.propagate = propagate


def _encoder(tmp_path: Path) -> Path:
    """A tiny BERT saved as a plain encoder (`BertModel`: no head), with its tokenizer."""
    return model_folder(tmp_path, "feature-extraction")


def _bert_config() -> BertConfig:
    return BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """transformers' messages (caplog holds the root logger's too: deltatune's busy-machine note)."""
    return [record.getMessage() for record in caplog.records if record.name.startswith("transformers")]


def _report_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(_logged(caplog))


def _transformers_reports_a_new_classifier(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reference: a plain `from_pretrained` of `folder` for seq-cls logs transformers' report naming
    `classifier` (so the test sees its absence, not a logger that logs nothing)."""
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    report = _report_text(caplog)
    assert "classifier.weight" in report and any(word in report for word in REPORT_WORDS)
    caplog.clear()


def test_a_plain_encoder_loaded_for_seq_cls_says_its_new_head_in_one_line_not_transformers_report(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, recwarn
) -> None:
    encoder = _encoder(tmp_path)
    _transformers_reports_a_new_classifier(encoder, transformers_log)
    capsys.readouterr()
    prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", model=str(encoder))))
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "new head: classifier (32 → 2 labels: no, yes), not in the checkpoint, so initialised at random; "
        "it trains with the adapter"
    ]
    assert not any(word in out + err + _report_text(transformers_log) for word in REPORT_WORDS)
    assert not [warning for warning in recwarn if issubclass(warning.category, RandomWeightsWarning)]


@pytest.mark.parametrize(
    ("task", "head"),
    [
        ("token-cls", "classifier (32 → 2 labels: NUM, O)"),
        ("qa", "qa_outputs (32 → 2: answer start and end)"),
    ],
)
def test_other_task_heads_are_said_with_their_shape_and_outputs(
    task: str, head: str, tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """A token classifier drops the encoder's pooler (unexpected weights: transformers' normal case, said
    nothing of), and a QA head has span outputs rather than labels."""
    encoder = _encoder(tmp_path)
    capsys.readouterr()
    prepare_run(TrainConfig.from_yaml(task_config(tmp_path, task, model=str(encoder))))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"new head: {head}, not in the checkpoint")
    assert not any(word in _report_text(transformers_log) for word in REPORT_WORDS)


def test_a_missing_encoder_weight_still_warns_naming_it(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    encoder = _encoder(tmp_path)
    weights = load_file(encoder / "model.safetensors")
    removed = next(key for key in weights if key.endswith("encoder.layer.1.output.dense.weight"))
    save_file({key: value for key, value in weights.items() if key != removed}, encoder / "model.safetensors")
    with pytest.warns(RandomWeightsWarning, match=r"lacks 1 weight .*encoder\.layer\.1\.output\.dense\.weight"):
        load_model(str(encoder), get_task("seq-cls"), label_names=["no", "yes"])
    assert capsys.readouterr().out.startswith("new head: classifier (32 → 2 labels: no, yes)")


def test_an_unused_weight_inside_the_encoder_warns_naming_it(tmp_path: Path) -> None:
    """A weight the checkpoint holds under a module the model has, but no place for (the reference: transformers
    reports it as unexpected), is a config that does not fit the weights: said by name."""
    encoder = _encoder(tmp_path)
    weights = load_file(encoder / "model.safetensors")
    owner = next(key for key in weights if key.endswith("encoder.layer.0.output.dense.weight")).rpartition(".")[0]
    save_file({**weights, f"{owner}.scale": torch.ones(32)}, encoder / "model.safetensors")
    _, info = AutoModelForSequenceClassification.from_pretrained(encoder, output_loading_info=True)
    assert [key.endswith("output.dense.scale") for key in info["unexpected_keys"]] == [True]
    with pytest.warns(RandomWeightsWarning, match=r"holds 1 weight .*encoder\.layer\.0\.output\.dense\.scale"):
        load_model(str(encoder), get_task("seq-cls"), label_names=["no", "yes"])


def test_an_mlm_checkpoint_without_a_pooler_warns_that_the_pooler_starts_at_random(tmp_path: Path) -> None:
    """`BertForMaskedLM` has no pooler, which a BERT classifier reads: random and frozen, it must be said."""
    folder = tmp_path / "bert-mlm"
    BertForMaskedLM(_bert_config()).save_pretrained(folder)
    with pytest.warns(RandomWeightsWarning, match=r"lacks 2 weights .*bert\.pooler\.dense\.bias.*modules_to_save"):
        load_model(str(folder), get_task("seq-cls"), label_names=["no", "yes"])


def test_a_folder_that_holds_its_head_prints_nothing(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, recwarn
) -> None:
    folder = model_folder(tmp_path, "seq-cls", arch="bert")
    capsys.readouterr()
    prepare_run(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", model=str(folder))))
    out, err = capsys.readouterr()
    assert out == "" and not any(word in err for word in REPORT_WORDS)  # err: transformers' progress bars
    assert _logged(transformers_log) == [] and not recwarn.list


def test_a_bert_pretraining_checkpoint_drops_its_pretraining_heads_without_a_word(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, recwarn
) -> None:
    """A BERT saved with its MLM and next-sentence heads (as bert-base-uncased is): transformers reports the
    heads' weights as unexpected (checked by the reference load); they belong to modules a classifier does
    not have, which is transformers' normal case, so only the new head is said."""
    folder = tmp_path / "bert-pretraining"
    BertForPreTraining(_bert_config()).save_pretrained(folder)
    word_tokenizer(pair_template=True).save_pretrained(folder)
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert any(key.startswith("cls.") for key in info["unexpected_keys"])
    transformers_log.clear()
    load_model(str(folder), get_task("seq-cls"), label_names=["no", "yes"])
    assert capsys.readouterr().out.startswith("new head: classifier (32 → 2 labels: no, yes)")
    assert _logged(transformers_log) == [] and not recwarn.list


def test_quiet_silences_the_new_head_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = task_config(tmp_path, "seq-cls", model=str(_encoder(tmp_path)))
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 0
    assert "new head" not in capsys.readouterr().out


def test_eval_with_an_adapter_that_holds_the_head_says_nothing_of_it(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    config = task_config(tmp_path, "seq-cls", model=str(_encoder(tmp_path)))
    assert main(["train", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.lstrip().startswith("{") and "new head" not in out
    assert not any(word in _report_text(transformers_log) for word in REPORT_WORDS)


def test_an_adapter_without_the_new_head_warns_that_predictions_are_random(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["query"])).save(str(tmp_path / "adapter"))
    with pytest.warns(RandomWeightsWarning, match=r"classifier .* holds no weights for it"):
        load_model(str(encoder), get_task("seq-cls"), label_names=["no", "yes"], adapter=tmp_path / "adapter")


def _tiny_gguf(tmp_path: Path) -> Path:
    """A tiny Llama written as a llama.cpp GGUF file (quantized linears, tied Q8_0 embedding; no task head)."""
    pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")
    from test_gguf_base import tiny_llama, write_gguf

    return write_gguf(tmp_path / "tiny-llama.gguf", tiny_llama())


def test_a_gguf_kept_base_says_its_new_head_as_the_dequantized_load_of_the_file_says_it(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """`quantize: gguf` builds the model itself, with no load report from transformers; its new `score` head is
    said in the same line as transformers' own (dequantizing) load of the file gets, and nothing else."""
    path = _tiny_gguf(tmp_path)
    lines = {}
    for quantize in (None, "gguf"):
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_model(str(path), get_task("seq-cls"), label_names=["no", "yes"], quantize=quantize)
        lines[quantize] = capsys.readouterr().out.splitlines()
        assert not [warning for warning in caught if issubclass(warning.category, RandomWeightsWarning)]
    assert lines[None] == [
        "new head: score (64 → 2 labels: no, yes), not in the checkpoint, so initialised at random; it trains with "
        "the adapter"
    ]
    assert lines["gguf"] == lines[None]
    assert not any(word in _report_text(transformers_log) for word in REPORT_WORDS)


def test_a_gguf_kept_base_warns_when_the_adapter_loaded_onto_it_holds_no_head(tmp_path: Path) -> None:
    from deltatune.gguf import load_gguf_model

    path = _tiny_gguf(tmp_path)
    model = load_gguf_model(path, AutoModelForSequenceClassification, num_labels=2)
    deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["q_proj"])).save(str(tmp_path / "adapter"))
    with pytest.warns(RandomWeightsWarning, match=r"score .* holds no weights for it"):
        load_model(
            str(path), get_task("seq-cls"), label_names=["no", "yes"], quantize="gguf", adapter=tmp_path / "adapter"
        )


def log_state_dict_report(logger: logging.Logger) -> None:
    """Logs as transformers 5.x's report function does (the hold knows its records by this name)."""
    logger.warning("LOAD REPORT from: folder")


def test_the_hold_lets_other_records_through_and_restores_the_logger(
    transformers_log: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger(REPORT_LOGGER)
    before = (logger.level, list(logger.handlers), list(logger.filters), logger.propagate)
    with held_load_report():
        logger.warning("another warning")
        log_state_dict_report(logger)
    assert _logged(transformers_log) == ["another warning"]
    assert (logger.level, list(logger.handlers), list(logger.filters), logger.propagate) == before


def test_a_load_that_fails_still_logs_transformers_report(transformers_log: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(REPORT_LOGGER)
    with pytest.raises(RuntimeError, match="look at the above report"), held_load_report():
        log_state_dict_report(logger)
        raise RuntimeError("For details look at the above report!")
    assert _logged(transformers_log) == ["LOAD REPORT from: folder"]


def test_a_head_of_another_shape_fails_as_transformers_fails_with_its_report(
    tmp_path: Path, transformers_log: pytest.LogCaptureFixture
) -> None:
    """The reference: a plain `from_pretrained` with another `num_labels`; what it logs and raises,
    `load_model` logs and raises too."""
    folder = model_folder(tmp_path, "seq-cls", arch="bert")
    with pytest.raises(RuntimeError) as expected:
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    reference = _logged(transformers_log)
    transformers_log.clear()
    with pytest.raises(RuntimeError) as actual:
        load_model(str(folder), get_task("seq-cls"), label_names=["a", "b", "c"])
    assert str(actual.value) == str(expected.value)
    assert _logged(transformers_log) == reference
