"""Classification adapters record their task, label names and head shape (`deltatune.task_record`), and
`deltatune.load`, `deltatune eval` and `deltatune merge` rebuild the head from them: a seq-cls adapter
trained from a plain encoder folder (no classifier in it) merges into a model that transformers'
`AutoModelForSequenceClassification` loads with the adapter's predictions and label names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification, BertModel

import deltatune
from deltatune.train import TrainConfig, train
from deltatune.train.cli import main
from training_fixtures import model_folder, records, task_config, write_jsonl

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _plain_encoder_folder(tmp_path: Path) -> Path:
    """A tiny BERT saved as a plain encoder (`BertModel`: no classifier), with its tokenizer."""
    folder = model_folder(tmp_path, "feature-extraction")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    return folder


def test_merge_of_a_seq_cls_adapter_from_a_plain_encoder_folder_loads_with_automodel_with_its_predictions(
    tmp_path: Path,
) -> None:
    encoder = _plain_encoder_folder(tmp_path)
    result = train(TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", model=str(encoder))), progress=False)
    adapter = tmp_path / "out" / "adapter"
    assert main(["merge", str(encoder), str(adapter), str(tmp_path / "merged")]) == 0

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is BertForSequenceClassification
    assert merged.config.id2label == {0: "no", 1: "yes"}  # the training data's label names, sorted
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer([row["text"] for row in records("seq-cls")], return_tensors="pt", padding=True)
    trained = result.run.delta_model.eval()
    with torch.no_grad():
        expected, actual = trained(**batch).logits, merged(**batch).logits
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def _classifier_adapter(tmp_path: Path, format: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A LoRA + classifier adapter on a 3-label BERT classifier, saved; (folder, inputs, its logits)."""
    torch.manual_seed(0)
    BertModel(BertForSequenceClassification.config_class(**_bert_settings())).save_pretrained(tmp_path / "encoder")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=3, id2label=LABELS)
    config = deltatune.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    delta_model = deltatune.attach(model, config).eval()
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    delta_model.save(str(tmp_path / "adapter"), format=format)
    inputs = torch.randint(6, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return tmp_path / "adapter", inputs, delta_model(input_ids=inputs).logits


def _bert_settings() -> dict:
    return {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_load_rebuilds_a_head_of_another_shape_and_takes_the_label_names(format: str, tmp_path: Path) -> None:
    folder, inputs, expected = _classifier_adapter(tmp_path, format)
    two_labels = BertForSequenceClassification.from_pretrained(tmp_path / "encoder")  # num_labels 2 by default
    assert two_labels.classifier.out_features == 2
    loaded = deltatune.load(two_labels, str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=inputs).logits, expected, atol=1e-6)
    assert loaded.config.id2label == LABELS and loaded.config.num_labels == 3
    merged = loaded.unload(merge=True)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=inputs).logits, expected, atol=1e-5)
    assert again.config.id2label == LABELS


def test_the_folder_records_task_labels_and_head_shape(tmp_path: Path) -> None:
    folder, _, _ = _classifier_adapter(tmp_path, "deltatune")
    recorded = json.loads((folder / "adapter_config.json").read_text())["task"]
    assert recorded == {
        "task": "seq-cls",
        "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
        "heads": {"classifier": {"weight": [3, 32], "bias": [3]}},
    }
    card = (folder / "README.md").read_text()
    assert "- **Task:** `seq-cls`" in card and "0 = `negative`, 1 = `neutral`, 2 = `positive`" in card


def test_loading_onto_a_model_without_the_head_names_the_class_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    folder, _, _ = _classifier_adapter(tmp_path, "deltatune")
    encoder = BertModel.from_pretrained(tmp_path / "encoder")
    with pytest.raises(deltatune.AdapterShapeError, match=r"head 'classifier'.*AutoModelForSequenceClassification"):
        deltatune.load(encoder, str(folder))
    assert not any("deltatune" in name for name, _ in encoder.named_modules())


def test_a_failed_load_puts_the_old_head_back(tmp_path: Path) -> None:
    folder, _, _ = _classifier_adapter(tmp_path, "deltatune")
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["config"]["r"] = 8  # the file's LoRA tensors no longer fit: the load fails after the head was rebuilt
    config_file.write_text(json.dumps(data))
    model = BertForSequenceClassification.from_pretrained(tmp_path / "encoder")
    head, labels = model.classifier, dict(model.config.id2label)
    with pytest.raises(deltatune.AdapterShapeError):
        deltatune.load(model, str(folder))
    assert model.classifier is head and model.config.id2label == labels


def test_eval_builds_the_head_with_the_adapters_labels_not_the_data_files(tmp_path: Path) -> None:
    """The eval config's train_file holds two of the adapter's three labels: the head built from it would be
    2-way, which the 3-way adapter cannot fill, and its ids would not be the adapter's."""
    words = {"cat": "animal", "red": "color", "two": "number"}
    rows = [{"text": f"{word} is good {index}", "label": label} for index in range(6) for word, label in words.items()]
    data = write_jsonl(tmp_path / "three.jsonl", rows)
    config = task_config(
        tmp_path, "seq-cls", model=str(_plain_encoder_folder(tmp_path)), train_file=data, eval_file=data
    )
    result = train(TrainConfig.from_yaml(config), progress=False)
    two = write_jsonl(tmp_path / "two.jsonl", [row for row in rows if row["label"] != "animal"])
    from deltatune.train.loop import prepare_run

    run = prepare_run(TrainConfig.from_yaml(config, [f"train_file={two}"]), adapter=str(tmp_path / "out" / "adapter"))
    assert run.delta_model.config.id2label == {0: "animal", 1: "color", 2: "number"}
    assert run.evaluate(progress=False).metrics == pytest.approx(result.final.metrics, abs=1e-6)


def test_a_head_that_holds_another_adapter_is_not_rebuilt(tmp_path: Path) -> None:
    folder, _, _ = _classifier_adapter(tmp_path, "deltatune")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "encoder")
    other = deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(deltatune.AdapterShapeError, match="another adapter's part"):
        deltatune.load(other, str(folder), name="second")
    assert list(other.configs) == ["default"] and other.classifier.out_features == 2


def test_a_full_folder_records_its_head_and_loads_onto_a_model_with_another_num_labels(tmp_path: Path) -> None:
    """`full` trains the head in place (no modules_to_save), and records its shape all the same, so the
    load rebuilds a head of the model's other num_labels and predicts as the trained model did."""
    torch.manual_seed(0)
    BertModel(BertForSequenceClassification.config_class(**_bert_settings())).save_pretrained(tmp_path / "encoder")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=3, id2label=LABELS)
    trained = deltatune.attach(model, deltatune.FullConfig()).eval()
    trained.save(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task"]
    assert recorded["heads"] == {"classifier": {"weight": [3, 32], "bias": [3]}}
    inputs = torch.randint(6, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    two_labels = BertForSequenceClassification.from_pretrained(tmp_path / "encoder")
    loaded = deltatune.load(two_labels, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=inputs).logits, trained(input_ids=inputs).logits)
    assert loaded.config.id2label == LABELS


def test_load_takes_the_recorded_label_names_for_a_head_of_the_same_shape(tmp_path: Path) -> None:
    """The label ids the saved head predicts mean the recorded names, whatever names the model was
    loaded with; a load that fails leaves the model's names as they were."""
    folder, _, _ = _classifier_adapter(tmp_path, "deltatune")
    reversed_labels = {index: LABELS[2 - index] for index in LABELS}
    model = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", id2label=reversed_labels)
    loaded = deltatune.load(model, str(folder))
    assert loaded.config.id2label == LABELS
    assert loaded.config.label2id == {label: index for index, label in LABELS.items()}
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["config"]["r"] = 8  # the file's LoRA tensors no longer fit: the load fails after the labels were set
    config_file.write_text(json.dumps(data))
    other = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", id2label=reversed_labels)
    with pytest.raises(deltatune.AdapterShapeError):
        deltatune.load(other, str(folder))
    assert other.config.id2label == reversed_labels


def test_a_method_placed_on_the_backbone_records_only_the_task_head(tmp_path: Path) -> None:
    """ReFT watches the backbone module (`bert`) for token positions: the backbone is no head, so the task
    record names the classifier alone (not every backbone shape, which a load onto another base would try
    to rebuild as a head)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertForSequenceClassification.config_class(**_bert_settings(), num_labels=3))
    config = deltatune.LoReftConfig(r=1, modules_to_save=["classifier"])
    delta_model = deltatune.attach(model, config)
    delta_model.save(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task"]
    assert list(recorded["heads"]) == ["classifier"]
