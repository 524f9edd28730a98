"""What a folder's adapter must agree with in its own weights file before anything of it is built: its task
record (`check_task_against_file`: the heads it rebuilds, their label names) and its config's ranks
(`check_ranks`). A shape the folder's JSON gives is so never allocated before it is compared with the tensors
the file holds, and a contradictory folder is one `AdapterFileError` naming it, with the model unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AdapterFileError
from .peft_format import PeftLayout
from .task_record import file_problem

if TYPE_CHECKING:
    from torch import nn

    from .adapter_tensors import ReadAdapter


def check_task_against_file(read: ReadAdapter, model: nn.Module, folder: Path) -> None:
    """Refuse (`AdapterFileError`) a task record of the adapter `read` from `folder` that contradicts its weights
    file or `model` (`task_record.file_problem`): nothing is built or changed before."""
    if not read.task:
        return
    shapes = {key: list(tensor.shape) for key, tensor in read.tensors.items()}
    problem = file_problem(read.task, model, shapes, _head_key_prefix(read))
    if problem is not None:
        raise AdapterFileError(
            f"{folder} records a task that contradicts its weights or this model ({problem}); save the adapter "
            "again, or delete that record to load the adapter without it"
        )


def _head_key_prefix(read: ReadAdapter) -> str:
    """What comes before `<head>.<parameter>` in the weights file's key of a head's parameter: peft's prefix of
    its `modules_to_save` copies, nothing in ours."""
    return read.layout.codec.model_prefix if isinstance(read.layout, PeftLayout) else ""


RANK_FIELDS = ("r", "init_r")
"""Config fields that give an adapter's rank (the number of rows or columns of its factors), as do the whole-number
values of a `rank_pattern`."""


def check_ranks(read: ReadAdapter, model: nn.Module, folder: Path) -> None:
    """Refuse (`AdapterFileError`) a config whose rank exceeds every dimension of the folder's tensors and of
    `model`'s weights: a saved adapter's rank is a dimension of its factors in the file (or, where a factor is kept
    whole, as LoKr's above half its width, no larger than a layer of the model), so such a folder contradicts
    itself, and building its adapter first could ask for far more memory than the model has (r = 10⁹ on a
    32-wide layer is 128 GB)."""
    pattern = getattr(read.config, "rank_pattern", None) or {}
    ranks = [getattr(read.config, field, None) for field in RANK_FIELDS] + list(pattern.values())
    ranks = [rank for rank in ranks if isinstance(rank, int)]  # AdaLoRA's pattern holds kept masks
    if not ranks:
        return
    tensors = [*read.tensors.values(), *model.parameters()]
    largest = max((max(tensor.shape, default=1) for tensor in tensors), default=1)
    too_large = max(ranks)
    if too_large > largest:
        raise AdapterFileError(
            f"{folder} configures a rank r={too_large} beyond the largest dimension of its weights and of this "
            f"model's, which is {largest}: the file does not hold an adapter of that rank; save the adapter again"
        )
