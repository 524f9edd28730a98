"""Soft prompts in peft's files: what the codecs of prompt, P- and prefix tuning share.

peft stores one table under the bare key `prompt_embeddings`, whatever produced it: the prompt P
(n × token_dim) for prompt and P-tuning, the prefix T (n × num_layers·2·token_dim) for prefix tuning; an
encoder's output is stored, never the encoder. The config holds the prompt's shape (`num_virtual_tokens`,
`token_dim`, `num_layers`, `num_attention_heads`, `num_transformer_submodules`). The table is written with
one transformer submodule, so it has exactly our n rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedFormatError
from ..peft_format import PeftCodec, task_type_of
from ..peft_keys import SOFT_PROMPT_READ, SOFT_PROMPT_TOLERATED, check_method_keys
from ..site_adapter import SiteAdapter
from .prompt_input import PromptInput
from .soft_prompt import SoftPromptConfig, embedding_width

PROMPT_KEY = "prompt_embeddings"
SOURCE = "source.weight"
"""The name, in our files, of the table the prompt's holder keeps (its `source`, a `PromptTable`)."""


class SoftPromptPeft(PeftCodec):
    """A soft prompt's codec: its holder's table under `prompt_embeddings`; its other adapters store nothing."""

    model_prefix = "base_model."
    prompt_holder: ClassVar[type[SiteAdapter]]
    """The adapter type whose `source()` gives the table."""

    def check_keys(self, data: dict[str, Any]) -> None:
        check_method_keys(data, SOFT_PROMPT_READ, SOFT_PROMPT_TOLERATED)

    def task_type(self, config: SoftPromptConfig, model: nn.Module) -> str:
        """The model's task type; refused where peft has none, since its plain `PeftModel` ignores a prompt."""
        task_type = task_type_of(model)
        if task_type is None:
            raise UnsupportedFormatError(
                f"peft has no task type for {type(model).__name__}, and without one it loads a soft prompt that "
                "does nothing; save this adapter with format='deltatune', or attach it to a causal LM, seq2seq "
                "LM or classification model"
            )
        return task_type

    def config_to_peft(self, config: SoftPromptConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": embedding_width(model),
            "num_transformer_submodules": 1,
            "num_attention_heads": model.config.num_attention_heads,
            "num_layers": model.config.num_hidden_layers,
        }

    def tensor_key(self, module_name: str, adapter: SiteAdapter, tensor_name: str) -> str:
        if isinstance(adapter, self.prompt_holder) and tensor_name == SOURCE:
            return PROMPT_KEY
        return super().tensor_key(module_name, adapter, tensor_name)

    def file_state(self, adapter: SiteAdapter) -> dict[str, torch.Tensor]:
        if not isinstance(adapter, self.prompt_holder):
            return {}
        with torch.no_grad():  # the inference kernels (an LSTM's differ in the last bits with autograd on)
            return {SOURCE: adapter.source()}


class PromptInputPeft(SoftPromptPeft):
    """Prompt and P-tuning: the prompt at the input stack."""

    prompt_holder = PromptInput

    def tensors_from_peft(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's seq2seq prompt keeps n rows per transformer submodule and feeds the first n to the
        encoder: keep those."""
        if (data.get("num_transformer_submodules") or 1) > 1 and PROMPT_KEY in tensors:
            return {**tensors, PROMPT_KEY: tensors[PROMPT_KEY][: data["num_virtual_tokens"]]}
        return tensors
