"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): the prompt comes from a small
encoder over n learned vectors.

    e = Embedding(n, d)(0..n-1)                                    n × d
    MLP:   P = W₃ relu(W₂ relu(W₁ e))                                W₁: d→h, W₂: h→h, W₃: h→d
    LSTM:  P = W₂ relu(W₁ BiLSTM(e))                                 BiLSTM: d→2h, W₁: 2h→2h, W₂: 2h→d
    inputs_embeds = [P ; E(x)]

The encoder only helps training; `collapse_soft_prompt` folds it into the table P it produces (the
adapter then is a prompt-tuning adapter), and peft's files hold only P (`prompt_embeddings`). Our own
files keep the encoder, so a saved adapter trains on from where it stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..field_check import DropoutRate, PositiveInt
from ..placement import Placement
from ..registry import register
from .prompt_input import PromptInputMethod
from .prompt_tuning import PromptTuningConfig
from .soft_prompt import SoftPromptConfig, embedding_width
from .soft_prompt_peft import PromptInputPeft

ENCODER_TYPES = ("MLP", "LSTM")


@dataclasses.dataclass
class PTuningConfig(SoftPromptConfig):
    """P-tuning settings; field names follow peft's `PromptEncoderConfig`."""

    encoder_reparameterization_type: str = "MLP"
    """The prompt encoder: "MLP" (three linear layers) or "LSTM" (a bidirectional LSTM, then two linears)."""
    encoder_hidden_size: PositiveInt | None = None
    """h, the encoder's hidden size; None: the model's hidden size."""
    encoder_num_layers: PositiveInt = 2
    """Layers of the LSTM (the MLP always has three linear layers)."""
    encoder_dropout: DropoutRate = 0.0
    """Dropout between LSTM layers."""

    def normalise(self) -> None:
        super().normalise()
        self.encoder_reparameterization_type = str(
            getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        ).upper()

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise DeltaTuneError(
                f"encoder_reparameterization_type must be one of {ENCODER_TYPES}, got "
                f"{self.encoder_reparameterization_type!r}"
            )

    def collapsed(self) -> PromptTuningConfig:
        return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, modules_to_save=self.modules_to_save)


class PromptEncoder(nn.Module):
    """n learned vectors through an MLP or a BiLSTM + MLP; `forward()` gives the prompt P (n × d)."""

    def __init__(self, count: int, width: int, config: PTuningConfig, reference: torch.Tensor) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or width
        self.embedding = nn.Embedding(count, width)
        self.lstm = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm = nn.LSTM(
                width,
                hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
            )
        self.to(device=reference.device, dtype=reference.dtype)

    def forward(self) -> torch.Tensor:
        vectors = self.embedding.weight[None]
        if self.lstm is not None:
            vectors = self.lstm(vectors)[0]
        return self.mlp(vectors)[0]


class PTuningPeft(PromptInputPeft):
    """peft's P_TUNING: the encoder's settings are written, but its files hold only the encoder's
    output, so they load as the collapsed adapter (a prompt-tuning table)."""

    peft_type = "P_TUNING"

    def config_to_peft(self, config: PTuningConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        fields = super().config_to_peft(config, targets, model)
        return {
            **fields,
            "encoder_reparameterization_type": config.encoder_reparameterization_type,
            "encoder_hidden_size": config.encoder_hidden_size or fields["token_dim"],
            "encoder_num_layers": config.encoder_num_layers,
            "encoder_dropout": config.encoder_dropout,
        }

    def config_from_peft(self, data: dict[str, Any]) -> PromptTuningConfig:
        return PromptTuningConfig.from_dict({"num_virtual_tokens": data["num_virtual_tokens"]})


@register("p_tuning")
class PTuning(PromptInputMethod):
    """A prompt from a small trained encoder, in front of the input."""

    config_class = PTuningConfig
    peft_codec = PTuningPeft()

    def build_source(self, placement: Placement, config: PTuningConfig) -> nn.Module:
        model = placement.model
        return PromptEncoder(
            config.num_virtual_tokens, embedding_width(model), config, model.get_input_embeddings().weight
        )
