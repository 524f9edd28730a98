"""The model card (`README.md`) every save writes into an adapter folder: base model, method and config,
trainable parameters, the run's final metrics (when the trainer saved it), the files in the folder, and
how to load it in deltatune, peft (peft format) and transformers.

It opens with the Hub's YAML block (`base_model`, `library_name`, `tags`) and then `MARKER`, by which a
save knows a card it wrote: a save replaces such a card, and never a `README.md` without the marker
(the user's own, which stays as it was).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import Writer
from .site_adapter import SiteAdapter
from .task_record import task_record

if TYPE_CHECKING:
    from .model import DeltaModel

CARD_FILE = "README.md"
MARKER = "<!-- deltatune model card: a save replaces this file; delete this line to keep your edits -->"
FILE_ROLES = {
    "deltatune": {
        "adapter_config.json": "the method and its config, the base model and the fingerprint of its weights",
        "adapter_model.safetensors": "the adapter's weights",
    },
    "peft": {
        "adapter_config.json": "peft's config: the method, its settings and the base model",
        "adapter_model.safetensors": "the adapter's weights; its metadata, the fingerprint of the base's weights",
    },
    "adapterhub": {
        "adapter_config.json": "AdapterHub's config: the adapter's name, its architecture and settings, the base model",
        "adapter.safetensors": "the adapter's weights under AdapterHub's names",
    },
}
"""Format → what each file of a saved adapter holds (the card's table of files)."""


@dataclass(frozen=True)
class CardFacts:
    """What a card says of one saved adapter, gathered before the folder is written."""

    name: str
    format: str
    folder_name: str
    base_model: str | None
    model_class: str | None
    """The transformers class of the base (`LlamaForCausalLM`), None for another model."""
    method: str
    config: dict[str, Any]
    trainable: int
    total: int
    metrics: Mapping[str, float] | None
    task: Mapping[str, Any] | None = None
    """The task record (`task_record`): task, label names, heads."""
    merges: bool = True
    """Whether every part of the adapter folds into weights (`delta_parameters`), so `deltatune merge` works."""


def is_ours(path: Path) -> bool:
    """Whether `path` is a card a save wrote (it holds `MARKER`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return MARKER in file.read(4096)
    except OSError:
        return False


def card_facts(
    delta_model: DeltaModel, name: str, format: str, folder: Path, metrics: Mapping[str, float] | None
) -> CardFacts:
    base = delta_model.base_model
    model_config = getattr(base, "config", None)
    summary = delta_model.trainable_summary()
    return CardFacts(
        name=name,
        format=format,
        folder_name=folder.name or str(folder),
        base_model=getattr(model_config, "name_or_path", None) or None,
        model_class=type(base).__name__ if model_config is not None else None,
        method=delta_model.configs[name].method,
        config=delta_model.configs[name].to_dict(),
        trainable=summary.per_adapter[name],
        total=summary.base,
        metrics=metrics,
        task=task_record(delta_model, name),
        merges=all(
            type(site.adapters[name]).delta_parameters is not SiteAdapter.delta_parameters
            for _, site in delta_model.sites()
            if name in site.adapters
        ),
    )


def card_writer(facts: CardFacts, files: list[str], old_card: Path) -> Writer:
    """A writer of the card; it runs after the writers of `files` (its siblings), and names their sizes.
    Where `old_card` (the folder's README before the save, read under the save's lock) is the user's own,
    it writes a copy of that instead."""

    def write(path: str) -> None:
        if old_card.is_file() and not is_ours(old_card):
            shutil.copy2(old_card, path)
            return
        folder = os.path.dirname(path)
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in files if name != CARD_FILE}
        with open(path, "w", encoding="utf-8") as file:
            file.write(card_text(facts, sizes))

    return write


def card_text(facts: CardFacts, sizes: Mapping[str, int]) -> str:
    """The card's Markdown."""
    base = facts.base_model or "the model it was trained on"
    share = 100.0 * facts.trainable / facts.total if facts.total else 0.0
    lines = ["---"] + ([f"base_model: {json.dumps(facts.base_model)}"] if facts.base_model else [])
    lines += [
        "library_name: peft" if facts.format == "peft" else "library_name: deltatune",
        "tags:",
        "- deltatune",
        f"- {facts.method}",
        "---",
        MARKER,
        "",
        f"# Adapter `{facts.name}`: {facts.method} on `{base}`",
        "",
        f"- **Base model:** `{base}`" + (f" (`{facts.model_class}`)" if facts.model_class else ""),
        f"- **Method:** `{facts.method}`, saved in {facts.format} format",
        f"- **Trainable parameters:** {facts.trainable:,} ({share:.4f}% of the base's {facts.total:,})",
        *_task_lines(facts.task),
        "",
        "## Config",
        "",
        "```json",
        json.dumps(facts.config, indent=2, sort_keys=True),
        "```",
        "",
    ]
    if facts.metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in facts.metrics.items()] + [""]
    lines += ["## Files", "", "| file | holds | size |", "|---|---|---|"]
    roles = FILE_ROLES.get(facts.format, {})
    lines += [f"| `{name}` | {roles.get(name, '')} | {_size(size)} |" for name, size in sizes.items()]
    lines += [f"| `{CARD_FILE}` | this card | |", ""]
    return "\n".join(lines + _how_to_load(facts))


def _task_lines(task: Mapping[str, Any] | None) -> list[str]:
    if not task:
        return []
    lines = [f"- **Task:** `{task['task']}`"]
    if task.get("id2label"):
        lines.append("- **Labels:** " + ", ".join(f"{index} = `{label}`" for index, label in task["id2label"].items()))
    for head, shapes in (task.get("heads") or {}).items():
        shown = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        lines.append(f"- **Head** `{head}` (trained fully, saved with the adapter): {shown}")
    return lines


def _how_to_load(facts: CardFacts) -> list[str]:
    model_class = facts.model_class or "AutoModel"
    auto_class = _auto_class(model_class)
    base = json.dumps(facts.base_model or "BASE_MODEL")
    folder = json.dumps(facts.folder_name)
    load_base = [f"from transformers import {auto_class}", "", f"base = {auto_class}.from_pretrained({base})"]
    lines = ["## How to load", "", "deltatune:", "", "```python", "import deltatune"]
    lines += load_base + [f"model = deltatune.load(base, {folder})", "```", ""]
    if facts.format == "peft":
        lines += ["peft:", "", "```python", "from peft import PeftModel"]
        lines += load_base + [f"model = PeftModel.from_pretrained(base, {folder})", "```", ""]
        lines += ["transformers (with peft installed):", "", "```python"]
        lines += load_base + [f"base.load_adapter({folder})", "```", ""]
    elif facts.format == "adapterhub":
        lines += ["AdapterHub (`pip install adapters`):", "", "```python", "import adapters"]
        lines += load_base + [
            "adapters.init(base)",
            f"base.load_adapter({folder}, use_safetensors=True, set_active=True)",
            "```",
            "",
        ]
    elif facts.merges:
        lines += [
            "transformers: merge the adapter into a full model folder, which transformers loads by itself",
            '(or save the adapter with `format="peft"`, which peft and transformers\' `load_adapter` read):',
            "",
            "```bash",
            f"deltatune merge {facts.base_model or 'BASE_MODEL'} {facts.folder_name} merged-model",
            "```",
            "",
        ]
    else:
        lines += [
            f"transformers alone cannot run it: a {facts.method} adapter cannot be merged into the base's weights",
            "(it adds computation no weight holds), so load it with deltatune as above.",
            "",
        ]
    return lines


def _auto_class(model_class: str) -> str:
    """The transformers auto class that loads `model_class` (`LlamaForCausalLM` → `AutoModelForCausalLM`)."""
    suffixes = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
    for suffix in suffixes:
        if model_class.endswith(suffix):
            return f"AutoModel{suffix}"
    if model_class.endswith("ForConditionalGeneration"):
        return "AutoModelForSeq2SeqLM"
    return "AutoModel"


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"
