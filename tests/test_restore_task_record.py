"""A trainer's resume or best-model load (`restore.restore_weights`) continues the run its checkpoint belongs to
only: a checkpoint whose task record (task, label names, head shapes) differs from the model's is refused, since
its head rows would be copied under other names (a resumed run would train them against the opposite targets),
and nothing of the model changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import deltatune
from deltatune.errors import CheckpointMismatchError
from deltatune.restore import restore_weights


def _classifier(id2label: dict[int, str]) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.id2label, config.label2id = id2label, {label: index for index, label in id2label.items()}
    return BertForSequenceClassification(config).eval()


def _attached(id2label: dict[int, str]) -> deltatune.DeltaModel:
    config = deltatune.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    return deltatune.attach(_classifier(id2label), config)


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_a_restore_refuses_a_checkpoint_whose_label_names_are_in_another_order(format: str, tmp_path: Path) -> None:
    checkpoint = _attached({0: "negative", 1: "positive"})
    with torch.no_grad():
        for parameter in checkpoint.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn_like(parameter))
    checkpoint.save(str(tmp_path / "checkpoint-2"), format=format)
    model = _attached({0: "positive", 1: "negative"})
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError, match="checkpoint-2.*labels \\['negative', 'positive'\\].*\\['positive', 'negative'\\]"
    ):
        restore_weights(model, tmp_path / "checkpoint-2")
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert model.base_model.config.id2label == {0: "positive", 1: "negative"}


def test_a_restore_of_a_checkpoint_with_the_same_labels_copies_its_weights(tmp_path: Path) -> None:
    """The refusal's counterpart: the same labels restore, giving the checkpoint's outputs exactly."""
    checkpoint = _attached({0: "negative", 1: "positive"})
    with torch.no_grad():
        for parameter in checkpoint.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn_like(parameter))
    checkpoint.save(str(tmp_path / "checkpoint-2"))
    model = _attached({0: "negative", 1: "positive"})
    restore_weights(model, tmp_path / "checkpoint-2")
    inputs = torch.randint(6, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=inputs).logits, checkpoint.eval()(input_ids=inputs).logits)
