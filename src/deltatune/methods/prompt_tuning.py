"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691): n learned embeddings in front of the input.

    inputs_embeds = [P ; E(x)],   P ∈ R^{n×d} (d: the model's hidden size), the only trained tensor

How P starts (`prompt_tuning_init`, peft's names):
- "RANDOM": P ~ N(0, σ²) with σ the standard deviation of the model's token embeddings, so the prompt
  starts at the scale of real tokens (the paper found the scale of the start matters);
- "TEXT": the embeddings of a text's tokens, repeated or cut to n (needs a tokenizer);
- "SAMPLE_VOCAB": the embeddings of n tokens drawn uniformly from the vocabulary.
The prompt enters through the input stack (see `soft_prompt`); the file holds P as `prompt_embeddings`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..placement import Placement
from ..registry import register
from .prompt_input import PromptInputMethod
from .soft_prompt import PromptTable, SoftPromptConfig
from .soft_prompt_peft import PromptInputPeft

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass
class PromptTuningConfig(SoftPromptConfig):
    """Prompt tuning settings; field names follow peft's `PromptTuningConfig`."""

    prompt_tuning_init: str = "RANDOM"
    """"RANDOM", "TEXT" (from `prompt_tuning_init_text`) or "SAMPLE_VOCAB"."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the prompt (with "TEXT")."""
    tokenizer_name_or_path: str | None = None
    """A tokenizer folder (or name, if it is cached locally) for "TEXT"."""
    tokenizer_kwargs: dict[str, Any] | None = None
    """Keyword arguments for `AutoTokenizer.from_pretrained` (with "TEXT")."""

    def normalise(self) -> None:
        super().normalise()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in INITS:
            raise DeltaTuneError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise DeltaTuneError(
                'prompt_tuning_init="TEXT" needs prompt_tuning_init_text: the text to start the prompt from'
            )
        if self.prompt_tuning_init == "TEXT" and not self.tokenizer_name_or_path:
            raise DeltaTuneError(
                'prompt_tuning_init="TEXT" needs a tokenizer to turn the text into tokens: set '
                "tokenizer_name_or_path to the model's tokenizer folder"
            )


def text_token_ids(config: PromptTuningConfig) -> list[int]:
    """The init text's token ids, repeated or cut to `num_virtual_tokens`."""
    from transformers import AutoTokenizer

    options = {key: value for key, value in (config.tokenizer_kwargs or {}).items() if key != "trust_remote_code"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **options)
    except (OSError, ValueError) as error:
        raise DeltaTuneError(
            f"cannot load the tokenizer {config.tokenizer_name_or_path!r} for the init text: {error}"
        ) from None
    token_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not token_ids:
        raise DeltaTuneError(f"the init text {config.prompt_tuning_init_text!r} gives no tokens; use a longer text")
    return list(itertools.islice(itertools.cycle(token_ids), config.num_virtual_tokens))


def initial_prompt(
    embedding: nn.Embedding, config: PromptTuningConfig, weights_from_file: bool = False
) -> torch.Tensor:
    """P at the start (n × d), in the embedding's dtype and device; random when the weights come from a
    file (no tokenizer is opened then)."""
    weight = embedding.weight
    count = config.num_virtual_tokens
    if weights_from_file or config.prompt_tuning_init == "RANDOM":
        std = weight.detach().float().std().item()
        return torch.randn(count, weight.shape[1], device=weight.device).mul(std).to(weight.dtype)
    if config.prompt_tuning_init == "TEXT":
        token_ids = torch.tensor(text_token_ids(config), device=weight.device)
        if int(token_ids.max()) >= weight.shape[0]:
            raise DeltaTuneError(
                f"the tokenizer {config.tokenizer_name_or_path!r} gives ids beyond the model's vocabulary "
                f"({weight.shape[0]}); use the model's own tokenizer"
            )
    else:
        token_ids = torch.randint(0, weight.shape[0], (count,), device=weight.device)
    return embedding(token_ids).detach().clone()


class PromptTuningPeft(PromptInputPeft):
    """peft's PROMPT_TUNING: the prompt's shape and how it started; the table loads as it is."""

    peft_type = "PROMPT_TUNING"
    init_fields = ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")

    def config_to_peft(self, config: PromptTuningConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {
            **super().config_to_peft(config, targets, model),
            **{name: getattr(config, name) for name in self.init_fields},
        }

    def config_from_peft(self, data: dict[str, Any]) -> PromptTuningConfig:
        fields = ("num_virtual_tokens", *self.init_fields)
        return PromptTuningConfig.from_dict({key: data[key] for key in fields if data.get(key) is not None})


@register("prompt_tuning")
class PromptTuning(PromptInputMethod):
    """A learned table of n virtual-token embeddings in front of the input."""

    config_class = PromptTuningConfig
    peft_codec = PromptTuningPeft()

    def build_source(self, placement: Placement, config: PromptTuningConfig) -> nn.Module:
        return PromptTable(initial_prompt(placement.model.get_input_embeddings(), config, placement.weights_from_file))
