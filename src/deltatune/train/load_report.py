"""transformers' report on loading a task model, said plainly.

A classification, token-classification or QA model loaded from a plain encoder folder gets a head
(`classifier`, `score`, `qa_outputs`) that the checkpoint lacks. transformers then logs its load report: a
`Key | Status` table (`classifier.weight | MISSING`) on 5.x, "Some weights of ... were not initialized ...
You should probably TRAIN this model" on 4.x, which a newcomer reads as an error. For that load only,
`held_load_report` holds back the records of the functions that log the report (one filter on their
logger, removed after: the logger's level and handlers are never touched, every other record passes), and
`report_load` says what the loading info (`output_loading_info=True`) holds. A GGUF-kept base (`quantize:
gguf`) is built by `deltatune.gguf.load_gguf_model`, with no report from transformers; its loading info, given
in transformers' form, is said the same way:

- a head none of whose parameters the checkpoint holds: one line, unless `quiet`,

      new head: classifier (384 → 2 labels: negative, positive), not in the checkpoint, so initialised at
      random; it trains with the adapter

  or, where an adapter folder is loaded onto the model next, nothing if the folder holds that head, and a
  `RandomWeightsWarning` if it does not (the model would predict from random weights);
- any other weight the checkpoint lacks (a partial checkpoint, missing encoder weights; the pooler of an
  MLM-only checkpoint): a `RandomWeightsWarning` naming them, `quiet` or not;
- checkpoint weights under modules the model does not have (the pretraining heads of a BERT checkpoint,
  the pooler a token classifier drops): transformers' normal case when a model of one task loads the
  checkpoint of another, so nothing, as transformers 4.x says nothing; weights under a module the model
  has (an extra layer, a renamed weight): a `RandomWeightsWarning`, since the model's own weights then
  likely start at random too.

Mismatched shapes never get here: our loads keep `ignore_mismatched_sizes=False`, so transformers raises.
A load that fails logs the held records after all, so transformers' explanation ("look at the above
report") is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RandomWeightsWarning
from ..task_record import LABELLED_TASKS, task_heads, task_of
from .start_line import shown_labels

REPORT_LOGGER = "transformers.modeling_utils"
REPORT_FUNCTIONS = frozenset({"log_state_dict_report", "_load_pretrained_model"})
"""The functions whose records on `REPORT_LOGGER` are the load report (transformers 5.x, 4.x)."""
SHOWN_KEYS = 6
"""Weight names a warning shows; more are counted."""
OUTPUT_NAMES = {"qa": "answer start and end"}
"""What a head's outputs are, for tasks without labels."""


class _ReportHold(logging.Filter):
    """Holds back the load report's records and lets every other record through."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName in REPORT_FUNCTIONS:
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def held_load_report() -> Iterator[None]:
    """Within: transformers' load report is held back (see the module docstring); logged after all if the
    block raises."""
    logger = logging.getLogger(REPORT_LOGGER)
    hold = _ReportHold()
    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold)
        for record in hold.held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def report_load(
    model: nn.Module, info: dict[str, Any], source: str, quiet: bool = False, adapter: str | Path | None = None
) -> None:
    """Say plainly what transformers' loading `info` for `model` (loaded from `source`) holds; `adapter`: the
    folder loaded onto the model next, whose saved heads replace the new ones."""
    missing = set(info.get("missing_keys") or ())
    heads = new_heads(model, missing)
    others = sorted(key for key in missing if not _under(key, heads))
    if others:
        _warn(
            f"{source} lacks {len(others)} weight{'s' if len(others) != 1 else ''} of {type(model).__name__} "
            f"outside its new task head, so they start at random: {_names(others)}; if the folder should hold "
            "them, save the complete model into it again (save_pretrained), else list their modules in "
            "modules_to_save so that they train"
        )
    misplaced = sorted(key for key in info.get("unexpected_keys") or () if _owner_in(model, key))
    if misplaced:
        _warn(
            f"{source} holds {len(misplaced)} weight{'s' if len(misplaced) != 1 else ''} that "
            f"{type(model).__name__}'s modules have no place for, so they were dropped: {_names(misplaced)}; check "
            "that the folder's config matches its weights"
        )
    if not heads:
        return
    if adapter is None:
        if not quiet:
            print(new_head_line(model, heads), flush=True)
        return
    saved = saved_heads(adapter)
    unsaved = [head for head in heads if saved is not None and head not in saved]
    if unsaved:
        _warn(
            f"{', '.join(unsaved)} of {type(model).__name__} is not in {source}, so it starts at random, and "
            f"{adapter} holds no weights for it: the model predicts from a random head; use an adapter trained "
            "with that head (deltatune train adds it to modules_to_save)"
        )


def new_heads(model: nn.Module, missing: Collection[str]) -> list[str]:
    """The task heads of `model` (`task_record.task_heads`) none of whose parameters the checkpoint held."""
    return [
        head
        for head in task_heads(model)
        if all(f"{head}.{name}" in missing for name, _ in model.get_submodule(head).named_parameters())
    ]


def new_head_line(model: nn.Module, heads: list[str]) -> str:
    """`new head: classifier (384 → 2 labels: negative, positive), not in the checkpoint, so initialised at
    random; it trains with the adapter`."""
    described = ", ".join(f"{head} ({_shape(model, head)})" for head in heads)
    return (
        f"new head{'s' if len(heads) != 1 else ''}: {described}, not in the checkpoint, so initialised at random; "
        f"{'it trains' if len(heads) == 1 else 'they train'} with the adapter"
    )


def saved_heads(adapter: str | Path) -> set[str] | None:
    """The heads adapter folder `adapter` (or its adapter subfolders) holds weights for: those a task record
    names, and `modules_to_save` (a folder written without a record); None where it holds no adapter (the
    load that follows says so)."""
    from ..folder_records import recorded_task
    from ..folder_summary import describe_folder
    from ..io import CONFIG_FILE

    root = Path(adapter)
    folders = [root] if (root / CONFIG_FILE).is_file() else []
    if not folders and root.is_dir():
        folders = [child for child in sorted(root.iterdir()) if (child / CONFIG_FILE).is_file()]
    if not folders:
        return None
    heads: set[str] = set()
    for folder in folders:
        heads |= set((recorded_task(folder) or {}).get("heads") or {})
        heads |= set(describe_folder(folder).config.get("modules_to_save") or ())
    return heads


def _shape(model: nn.Module, head: str) -> str:
    """`384 → 2 labels: negative, positive`: the features through the head's linear layers, then its outputs."""
    linears = [module for module in model.get_submodule(head).modules() if isinstance(module, nn.Linear)]
    if not linears:
        count = sum(parameter.numel() for parameter in model.get_submodule(head).parameters())
        return f"{count:,} parameters"
    features = " → ".join(map(str, [linears[0].in_features] + [linear.out_features for linear in linears]))
    task = task_of(model)
    id2label = getattr(model.config, "id2label", None) or {}
    if task in LABELLED_TASKS and len(id2label) == linears[-1].out_features:
        return f"{features} labels: {shown_labels([id2label[index] for index in sorted(id2label)])}"
    return f"{features}: {OUTPUT_NAMES[task]}" if task in OUTPUT_NAMES else features


def _under(key: str, modules: Collection[str]) -> bool:
    return any(key.startswith(f"{module}.") for module in modules)


def _owner_in(model: nn.Module, key: str) -> bool:
    """Whether the module that weight `key` belongs to is one of `model`'s, or of its backbone (transformers
    5.x names the unused weights of a backbone checkpoint as they are in it: `pooler.dense.weight`)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return any(_holds_module(root, key.rpartition(".")[0]) for root in (model, backbone) if isinstance(root, nn.Module))


def _holds_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _names(keys: list[str]) -> str:
    more = len(keys) - SHOWN_KEYS
    return ", ".join(keys[:SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")


def _warn(message: str) -> None:
    warnings.warn(message, RandomWeightsWarning, stacklevel=4)
