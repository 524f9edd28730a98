"""What transformers' `Trainer` and TRL's trainers ask of a model, answered by `DeltaModel` with peft's meaning.

Those trainers recognise a peft model by `isinstance(model, PeftModel)`; a `DeltaModel` is not one and does
not pretend to be. Where they or their users duck-type, a `DeltaModel` answers as a `PeftModel` would:

- `get_base_model()`: the wrapped model, its adapters inside (peft: the transformers model under the tuner).
- `disable_adapter()`: a block in which the model computes as its base model, adapters off (DPO's reference, as
  TRL takes it from a peft model and `adapter_trainer` from a `DeltaModel`, without a second copy of the base).
- `gradient_checkpointing_enable()`: non-reentrant by default; reentrant with the embeddings' output requiring
  gradients, as peft arranges, so the adapters inside checkpointed blocks still get theirs.
- `save_pretrained(path)`: the adapter folder (deltatune's format, or `format="peft"`), never the full model:
  transformers' own `save_pretrained`, reached through attribute forwarding, wrote a `model.safetensors` whose
  adapter keys `from_pretrained` drops.

Everything else a trainer reads (`config`, `get_input_embeddings`, `enable_input_require_grads`,
`warnings_issued`, `add_model_tags`, `_keys_to_ignore_on_save`...) is forwarded to the base model, whose answer
is the right one. Where the stock trainers decide by `isinstance` (`Trainer._save` writes a bare state dict for
any model that is neither a `PreTrainedModel` nor a `PeftModel`), `deltatune.adapter_trainer` adds the missing
branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from torch import nn


class TrainerFacing:
    """The peft-named methods of `DeltaModel` that trainers and their users call (mixed into `DeltaModel`)."""

    base_model: nn.Module

    def get_base_model(self) -> nn.Module:
        """The wrapped model with the adapters inside it, as peft's `get_base_model()` returns."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """peft's name for `disabled()`: inside the block the model computes as the base model."""
        with self.disabled():  # type: ignore[attr-defined]
            yield

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' gradient checkpointing, non-reentrant by default (frozen inputs still pass gradients).
        With `use_reentrant=True` a checkpointed block passes gradients only if its input needs them, and the
        frozen embeddings' output does not: their output is made to require gradients (peft's
        `enable_input_require_grads`), or the adapters inside the blocks would get none."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model  # transformers 5 renamed the method; both take the kwargs first
        (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)(kwargs)
        if kwargs["use_reentrant"]:
            base.enable_input_require_grads()

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        format: str = "deltatune",
        is_main_process: bool = True,
    ) -> None:
        """Write the adapters (default: all; peft's `selected_adapters` picks some) to the folder
        `save_directory`, as `save` does: one adapter in the folder itself, several in one subfolder each;
        `format="peft"` for peft's files. `is_main_process=False` (a non-writing rank) writes nothing. The
        base model is never written: it is the model the adapter folder is loaded onto."""
        if is_main_process:
            self.save(str(save_directory), selected_adapters, format)  # type: ignore[attr-defined]
