"""What an adapter folder records beside the adapter (`deltatune.folder_records`: the base fingerprint, the
task with its labels and heads) is checked where the folder is read: a malformed record (hand-edited, or
written by something else) is refused with an `AdapterFileError` naming the file and the record, before
anything is added to the model, in both our format (keys of adapter_config.json) and peft's (the weights'
metadata)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

import deltatune
from deltatune.errors import AdapterFileError
from deltatune.folder_records import FINGERPRINT_KEY, recorded_task
from deltatune.site import site_of
from deltatune.task_record import TASK_KEY

FORMATS = ["deltatune", "peft"]


def _classifier(labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.num_labels = labels
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module", params=FORMATS)
def saved(request, tmp_path_factory) -> Path:
    """A LoRA + classifier adapter saved in `format`: its folder records a fingerprint and a task."""
    folder = tmp_path_factory.mktemp(f"records-{request.param}") / "adapter"
    config = deltatune.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    deltatune.attach(_classifier(), config).save(str(folder), format=request.param)
    return folder


def _edited_copy(saved: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the saved folder whose records `edit` changed."""
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    records, write = _records(folder)
    edit(records)
    write(records)
    return folder


def _records(folder: Path) -> tuple[dict[str, Any], Callable[[dict[str, Any]], None]]:
    """(the folder's records, a writer of edited ones back where the folder's format keeps them)."""
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    data = json.loads(config_file.read_text())
    if data.get("format") == "deltatune":

        def write(records: dict[str, Any]) -> None:
            config_file.write_text(json.dumps({**data, **records}))

        return {key: data[key] for key in (FINGERPRINT_KEY, TASK_KEY)}, write
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as file:
        metadata = dict(file.metadata())
    tensors = load_file(str(weights_file))

    def write(records: dict[str, Any]) -> None:
        save_file(
            tensors, str(weights_file), {**metadata, **{key: json.dumps(value) for key, value in records.items()}}
        )

    return {key: json.loads(metadata[key]) for key in (FINGERPRINT_KEY, TASK_KEY)}, write


def _first_module(records: dict[str, Any]) -> str:
    return next(iter(records[FINGERPRINT_KEY]["modules"]))


MALFORMED: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "fingerprint-a-string": (FINGERPRINT_KEY, lambda r: r.update({FINGERPRINT_KEY: "garbage"})),
    "fingerprint-without-scheme": (FINGERPRINT_KEY, lambda r: r[FINGERPRINT_KEY].pop("scheme")),
    "fingerprint-modules-a-list": (FINGERPRINT_KEY, lambda r: r[FINGERPRINT_KEY].update(modules=["x"])),
    "fingerprint-entry-a-number": (
        FINGERPRINT_KEY,
        lambda r: r[FINGERPRINT_KEY]["modules"].update({_first_module(r): 7}),
    ),
    "fingerprint-entry-not-a-digest": (
        FINGERPRINT_KEY,
        lambda r: r[FINGERPRINT_KEY]["modules"].update({_first_module(r): "not a digest"}),
    ),
    "task-a-string": (TASK_KEY, lambda r: r.update({TASK_KEY: "seq-cls"})),
    "task-without-its-name": (TASK_KEY, lambda r: r[TASK_KEY].pop("task")),
    "task-name-a-list": (TASK_KEY, lambda r: r[TASK_KEY].update(task=["seq-cls"])),
    "label-id-not-a-number": (TASK_KEY, lambda r: r[TASK_KEY].update(id2label={"zero": "no", "one": "yes"})),
    "label-ids-with-a-gap": (TASK_KEY, lambda r: r[TASK_KEY].update(id2label={"0": "no", "2": "yes"})),
    "label-name-a-number": (TASK_KEY, lambda r: r[TASK_KEY].update(id2label={"0": 0, "1": 1})),
    "heads-a-list": (TASK_KEY, lambda r: r[TASK_KEY].update(heads=["classifier"])),
    "head-shape-not-whole-numbers": (
        TASK_KEY,
        lambda r: r[TASK_KEY]["heads"]["classifier"].update(weight=["2", 32]),
    ),
    "head-not-a-child-of-the-model": (TASK_KEY, lambda r: r[TASK_KEY].update(heads={"": {"weight": [2, 32]}})),
}
"""{case: (the record it breaks, the edit)}."""


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_record_is_refused_naming_the_file_and_the_record_before_anything_is_added(
    saved: Path, tmp_path: Path, case: str
) -> None:
    key, edit = MALFORMED[case]
    folder = _edited_copy(saved, tmp_path, edit)
    model = _classifier()
    classifier, before = model.classifier, {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=f"{folder}.* records a malformed {key}.*save the adapter again"):
        deltatune.load(model, str(folder))
    assert model.classifier is classifier and not any(site_of(module) for module in model.modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    if key == TASK_KEY:  # what `deltatune merge` and `eval` read to build the model, before any load
        with pytest.raises(AdapterFileError, match=f"{folder}.* records a malformed {key}"):
            recorded_task(folder)


def test_the_records_a_save_writes_pass_the_check_and_load(saved: Path) -> None:
    """The check refuses only what no save writes: every folder this version saves loads back."""
    records, _ = _records(saved)
    assert records[TASK_KEY]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert recorded_task(saved) == records[TASK_KEY]
    assert deltatune.load(_classifier(), str(saved)).records["default"].base_fingerprint == records[FINGERPRINT_KEY]


def test_a_null_record_is_one_the_folder_does_not_keep(saved: Path, tmp_path: Path) -> None:
    """As an older save, which records neither: it loads, with nothing to compare or rebuild."""
    folder = tmp_path / "nulls"
    shutil.copytree(saved, folder)
    _, write = _records(folder)
    write({FINGERPRINT_KEY: None, TASK_KEY: None})
    assert recorded_task(folder) is None
    assert "default" in deltatune.load(_classifier(), str(folder)).records


CONTRADICTING: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "head-rows-other-than-the-files": (
        lambda r: r[TASK_KEY]["heads"].update(classifier={"weight": [5, 32], "bias": [5]}),
        "classifier.weight.* shape \\[5, 32\\].* the weights file holds \\[2, 32\\]",
    ),
    "head-too-large-to-build": (
        lambda r: r[TASK_KEY]["heads"].update(classifier={"weight": [10**12, 32], "bias": [10**12]}),
        "classifier.weight.* shape \\[1000000000000, 32\\].* the weights file holds \\[2, 32\\]",
    ),
    "head-inside-the-backbone": (
        lambda r: r[TASK_KEY]["heads"].update(bert={"pooler.dense.weight": [32, 32], "pooler.dense.bias": [31]}),
        "head 'bert'.* not one of this model's heads \\(\\['classifier'\\]\\)",
    ),
    "fewer-label-names-than-head-rows": (
        lambda r: r[TASK_KEY].update(id2label={"0": "neg"}),
        "id2label holds 1 name.* head 'classifier' has 2 rows",
    ),
    "more-label-names-than-head-rows": (
        lambda r: r[TASK_KEY].update(id2label={"0": "neg", "1": "pos", "2": "neutral"}),
        "id2label holds 3 names.* head 'classifier' has 2 rows",
    ),
    "a-label-name-twice": (
        lambda r: r[TASK_KEY].update(id2label={"0": "pos", "1": "pos"}),
        "id2label names 'pos' twice",
    ),
}
"""{case: (an edit that makes the task record contradict the weights file or the model, the refusal's words)}."""


def _unchanged(model: BertForSequenceClassification) -> Callable[[], None]:
    """A check that `model` is as it was now: the same head object, no adapter part, the same weights and labels."""
    classifier, labels = model.classifier, dict(model.config.id2label)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def check() -> None:
        assert model.classifier is classifier and not any(site_of(module) for module in model.modules())
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
        assert model.config.id2label == labels

    return check


@pytest.mark.parametrize("case", list(CONTRADICTING))
def test_a_task_record_that_contradicts_the_weights_file_is_refused_before_any_head_is_rebuilt(
    saved: Path, tmp_path: Path, case: str
) -> None:
    edit, words = CONTRADICTING[case]
    folder = _edited_copy(saved, tmp_path, edit)
    model = _classifier()
    unchanged = _unchanged(model)
    with pytest.raises(AdapterFileError, match=f"{folder}.* records a task .*{words}"):
        deltatune.load(model, str(folder))
    unchanged()


def test_a_recorded_head_whose_weights_the_file_lacks_is_refused_before_it_is_rebuilt(tmp_path: Path) -> None:
    """A LoRA saved without its classifier (no modules_to_save) and a record naming a 5-row classifier: nothing
    in the file would fill the rebuilt head, so it would stay random."""
    folder = tmp_path / "adapter"
    deltatune.attach(_classifier(), deltatune.LoraConfig(r=2, target_modules=["query"])).save(str(folder))
    records, write = _records(folder)
    records[TASK_KEY]["heads"] = {"classifier": {"weight": [5, 32], "bias": [5]}}
    write(records)
    model = _classifier()
    unchanged = _unchanged(model)
    with pytest.raises(AdapterFileError, match=f"{folder}.* records a task .*'classifier.weight'.* file holds no"):
        deltatune.load(model, str(folder))
    unchanged()
