"""`adapter_trainer(trainer_class)`: a transformers or TRL trainer class that trains a `DeltaModel` as the stock
class trains a peft model.

The stock trainers set peft models apart by `isinstance(model, PeftModel)` where a `DeltaModel` needs the same
treatment; the subclass adds those branches for a `DeltaModel` and changes nothing for any other model:

- saving (`Trainer._save`, behind `save_model()` and every checkpoint): the adapter folder, through
  `DeltaModel.save_pretrained`, with the tokenizer and the training arguments beside it as usual. The stock
  trainer writes a non-`PreTrainedModel`'s whole state dict to `model.safetensors`. A checkpoint's folder is in
  the trainer's format where that keeps every adapter whole, else in deltatune's (`restore.lost_in`: peft's
  keeps a P-tuning encoder's output, not the encoder), so a resume always continues the run.
- DPO's reference model (`ref_model=None`, the trainer taking one): the same model with its adapters off
  (`AdaptersOff`, sharing every weight). The stock trainer loads a second full base from `config._name_or_path`.
- resuming (`train(resume_from_checkpoint=...)`) and `load_best_model_at_end`: the adapter weights come back from
  the checkpoint's adapter folder, in place, once it is checked to hold this adapter: a checkpoint of another
  method or other settings (`lora_alpha`, `use_rslora`, ...), or trained on other base weights, is refused before a
  weight is copied (`restore.restore_weights`). The stock trainer looks for a full model's weights file.
- reading the model (label names, whether it returns a loss, the data columns its forward takes): off the base
  model, as off a peft model's `get_base_model()`. The stock trainer reads the `DeltaModel`'s `**kwargs` forward,
  finds no labels (no eval loss) and, with `remove_unused_columns`, drops every data column.
- TRL SFT's `loss_type="chunked_nll"` (its default): the chunked loss goes on the base model's forward, as TRL puts
  it for a peft model, so the `DeltaModel`'s own forward still runs around it. The stock trainer replaces the
  wrapper's forward and calls `base_model` as if it were the transformers backbone (the crash of issue 16).

    SFTTrainer = deltatune.adapter_trainer(trl.SFTTrainer)
    trainer = SFTTrainer(model=delta_model, args=SFTConfig(...), train_dataset=data, processing_class=tokenizer)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from .errors import DeltaTuneError
from .site import site_of

if TYPE_CHECKING:
    from .model import DeltaModel

TrainerClass = TypeVar("TrainerClass", bound=type)


@functools.cache
def adapter_trainer(trainer_class: TrainerClass, format: str = "deltatune") -> TrainerClass:
    """`trainer_class` (transformers' `Trainer`, TRL's `SFTTrainer`, `DPOTrainer`, ... or a subclass) with the
    `DeltaModel` branches of `AdapterTrainerMixin`, saving adapter folders in `format` ("deltatune" or "peft");
    one class per (`trainer_class`, `format`)."""
    from .io import FORMATS

    if format not in FORMATS:
        raise DeltaTuneError(f"unknown adapter format {format!r}; use one of {tuple(FORMATS)}")
    return type(  # type: ignore[return-value]
        f"Adapter{trainer_class.__name__}",
        (AdapterTrainerMixin, trainer_class),
        {
            "__doc__": f"{trainer_class.__name__} that trains a DeltaModel's adapters and saves them as {format}.",
            "adapter_format": format,
        },
    )


class AdaptersOff(nn.Module):
    """A `DeltaModel` computing as its base model (adapters off), as a module of its own: DPO's reference. It
    holds no weights of its own; the `DeltaModel` it runs is the trained one."""

    def __init__(self, delta_model: DeltaModel) -> None:
        super().__init__()
        self.delta_model = delta_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.delta_model.disable_adapter():
            return self.delta_model(*args, **kwargs)


class AdapterTrainerMixin:
    """The `DeltaModel` branches a stock trainer lacks (see the module docstring); mixed in before the trainer."""

    adapter_format: str = "deltatune"
    """The format of the adapter folders `save_model()` writes: "deltatune" or "peft"."""
    _saving_checkpoint: bool = False
    """Whether `_save` writes a checkpoint (`_save_checkpoint`), whose folder must keep the adapters whole."""
    _said_checkpoint_format: bool = False
    """Whether the warning that checkpoints are in deltatune's format was given (once per trainer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        signature = inspect.signature(super().__init__)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        model = arguments.get("model")
        if not _is_delta_model(model):
            super().__init__(*args, **kwargs)
            return
        if "ref_model" in signature.parameters and arguments.get("ref_model") is None:
            arguments["ref_model"] = AdaptersOff(model)
        forward_replaced_before = "forward" in vars(model)
        super().__init__(**arguments)
        if getattr(self.args, "loss_type", None) == "chunked_nll" and not forward_replaced_before:
            _chunked_loss_on_base(model, is_vlm=getattr(self, "_is_vlm", False))
        from transformers.utils import can_return_loss, find_labels

        base_class = type(model.base_model)  # what the trainer reads off a peft model's `get_base_model()`
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)

    def _set_signature_columns_if_needed(self) -> None:
        """The data columns to keep: transformers' `Trainer` reads them off the model's forward, and for a
        `DeltaModel` (whose forward takes `**kwargs`) off its base model's, as it does for a peft model. A
        trainer that names its columns itself (TRL's) is left to do so."""
        from transformers import Trainer

        model = self.accelerator.unwrap_model(self.model)
        next_method = super()._set_signature_columns_if_needed
        if self._signature_columns is None and _is_delta_model(model):
            if next_method.__func__ is Trainer._set_signature_columns_if_needed:
                columns = list(inspect.signature(model.base_model.forward).parameters)
                self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names} - set(columns))
        next_method()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter folder of a `DeltaModel` (the stock `_save` for any other model), the tokenizer and the
        training arguments."""
        model = self.accelerator.unwrap_model(self.model)
        if not _is_delta_model(model):
            super()._save(output_dir, state_dict)
            return
        if state_dict is not None:
            raise DeltaTuneError(
                "the trainer gathered a sharded state dict (FSDP, DeepSpeed or SageMaker) to save; a DeltaModel's "
                "adapter is saved from its own parameters: train on one process or with DDP"
            )
        from transformers.trainer import TRAINING_ARGS_NAME

        folder = output_dir if output_dir is not None else self.args.output_dir
        format = self._checkpoint_format(model) if self._saving_checkpoint else self.adapter_format
        model.save_pretrained(folder, format=format, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """A checkpoint, its adapter folder kept whole (`_checkpoint_format`)."""
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _checkpoint_format(self, model: DeltaModel) -> str:
        """`adapter_format` where its folders keep every adapter whole, else "deltatune", said once."""
        from .restore import lost_in

        lost = lost_in(model, self.adapter_format)
        if not lost:
            return self.adapter_format
        if not self._said_checkpoint_format:
            name, tensors = next(iter(lost.items()))
            warnings.warn(
                f"checkpoints are saved in deltatune's format: a {self.adapter_format} folder keeps less of adapter "
                f"{name!r} ({model.configs[name].method}) than training changes (not {tensors[0]!r}), so a resume "
                f"could not continue from it; save_model() still writes the {self.adapter_format} folder",
                stacklevel=2,
            )
            self._said_checkpoint_format = True
        return "deltatune"

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """`resume_from_checkpoint`: a `DeltaModel`'s adapter weights come back from the checkpoint's adapter
        folder, in place, if it holds this adapter (the stock method for any other model)."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not _is_delta_model(target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        from .restore import restore_weights

        restore_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: a `DeltaModel`'s adapter weights come back from the best checkpoint."""
        target = self.accelerator.unwrap_model(self.model)
        if not _is_delta_model(target):
            super()._load_best_model()
            return
        from .restore import restore_weights

        restore_weights(target, self.state.best_model_checkpoint)


def _is_delta_model(model: object) -> bool:
    from .model import DeltaModel  # imported here: the package imports this module before `model`

    return isinstance(model, DeltaModel)


def _chunked_loss_on_base(delta_model: DeltaModel, is_vlm: bool) -> None:
    """Move TRL's chunked cross-entropy from the `DeltaModel`'s forward, where SFTTrainer put it, to its base
    model's, where TRL puts it for a peft model. The chunked loss reads the output layer's weight directly, so an
    adapted output layer is refused (its delta would be left out), as TRL refuses a peft-wrapped `lm_head`."""
    if "forward" not in vars(delta_model):
        return
    del delta_model.forward
    if site_of(delta_model.base_model.get_output_embeddings()) is not None:
        raise DeltaTuneError(
            "SFTConfig(loss_type='chunked_nll') computes the loss from the output layer's weight, which would leave "
            "out the adapter on it: leave the output layer out of target_modules or use loss_type='nll'"
        )
    sft = importlib.import_module("trl.trainer.sft_trainer")
    sft._patch_chunked_ce_lm_head(delta_model.base_model, chunk_size=sft._CHUNKED_LM_HEAD_CHUNK_SIZE, is_vlm=is_vlm)
