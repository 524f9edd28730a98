"""What `deltatune compare` runs: one training config per method, every one checked before any trains.

A `--methods` entry is a registered method name, or `LABEL=METHOD` to compare one method in several
settings (`houlsby=bottleneck,pfeiffer=bottleneck` with `--set houlsby.adapter.preset=houlsby`): the
label names the method's row, folder and `--set` prefix. Each method's config is the comparison's
config (with its `key=value` overrides) and:
- `adapter`: the config's own `adapter` section for the method it names, `{method: NAME}` (the method's
  defaults) for every other; the settings the config leaves out take each method's own recommended
  values (`method_defaults`), not those of the config's method;
- the budget, the same for all: `--max-steps`, `--epochs`, or the config's own steps; with
  `--time-budget` the same training time instead (`time_budget.py`);
- `output_dir`: `OUTPUT_DIR/<label>/` (its adapter, metrics.json and plot, as `deltatune train` leaves);
- then its own overrides, `--set LABEL.KEY=VALUE` (any `deltatune train` override: `lora.learning_rate=1e-3`,
  `lora.adapter.r=16`), which may not touch what the comparison holds equal (`SHARED_KEYS`).

Refused in one line, before any model trains: an unknown method, a label named twice, a budget that
is not finite and positive, a `--set` for a method not compared, of a shared key or of `adapter.method` (a label's
method is the one `--methods` names), a method whose config does not validate or that cannot attach to
the config's model for its task (every method is attached once to the loaded base, and taken off again),
a `--time-budget` for a method that schedules over the step count (AdaLoRA), an output folder that holds another
run (unless `--overwrite`, which still refuses a method folder's entries that no run wrote), and, whatever
`--overwrite` says, a compare file there that is a link (a comparison writes only inside its output folder and
never through a link, as a run does: `outputs.check_no_links`) or not a file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

from ..errors import DeltaTuneError
from ..names import name_problem
from ..registry import get_method
from .compare_report import COMPARE_FILES
from .config import TrainConfig, apply_overrides
from .outputs import check_no_links, check_replaceable, previous_run
from .time_budget import refuse_step_schedules

SHARED_KEYS = (
    *("model", "task", "tokenizer", "quantize", "seed"),
    *("train_file", "eval_file", "columns", "header", "column_names", "separator"),
    *("max_train_examples", "max_eval_examples", "max_length", "chat_template", "system_prompt", "max_new_tokens"),
    *("max_steps", "epochs", "batch_size", "gradient_accumulation_steps"),
    *("output_dir", "overwrite_output_dir"),
)
"""Config keys every method of a comparison shares, so that every row is trained and scored on the same thing: the
base and task, the seed, the records (the files, how they are read, the subsets drawn), the text the model sees
(cut at max_length, rendered with the chat template and system prompt), what is generated to be scored, the budget
and the folder. A `--set` of one of them is refused."""


class CompareError(DeltaTuneError):
    """A comparison that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """The budget of every method: optimizer steps, epochs, or seconds of training time (one at most;
    none: the config's own `max_steps` / `epochs`)."""

    max_steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        given = {"--max-steps": self.max_steps, "--epochs": self.epochs, "--time-budget": self.seconds}
        chosen = [flag for flag, value in given.items() if value is not None]
        if len(chosen) > 1:
            raise CompareError(f"give one budget, not {' and '.join(chosen)}")
        for flag, value in given.items():
            if value is not None and not (math.isfinite(value) and value > 0):  # inf: a run that never ends
                raise CompareError(
                    f"{flag} must be finite and positive, got {value:g}; give the budget every method trains for"
                )

    def settings(self) -> dict[str, int | float | None]:
        """The config keys the budget sets."""
        if self.max_steps is not None:
            return {"max_steps": self.max_steps}
        if self.epochs is not None:
            return {"epochs": self.epochs, "max_steps": None}
        return {}

    def describe(self, config: TrainConfig) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s of training time each"
        if config.max_steps is not None:
            return f"{config.max_steps} optimizer steps each"
        return f"{config.epochs:g} epochs each"


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """One method of a comparison: its label, its training config and the `--set` overrides that made it."""

    label: str
    method: str
    config: TrainConfig
    overrides: tuple[str, ...]


def plan_comparison(
    config_path: str | Path,
    methods: list[str],
    overrides: list[str],
    method_overrides: list[str],
    budget: Budget,
    overwrite: bool,
) -> tuple[TrainConfig, list[MethodPlan]]:
    """The comparison's own config and one plan per `--methods` entry (see the module docstring)."""
    labelled = _labelled_methods(methods)
    for method in labelled.values() if budget.seconds is not None else []:
        refuse_step_schedules(method)
    settings = TrainConfig.settings_from_yaml(config_path, overrides)  # as given: each method fills its defaults
    base = TrainConfig.from_dict(settings)
    if not base.eval_file:
        raise CompareError("a comparison scores every method on eval_file, and the config has none; add eval_file")
    per_label = _method_overrides(method_overrides, list(labelled))
    root = Path(base.output_dir)
    _check_output_dir(root, list(labelled), overwrite)
    plans = []
    for label, method in labelled.items():
        adapter = base.adapter if base.adapter.get("method") == method else {"method": method}
        data = {
            **copy.deepcopy(settings),
            "adapter": dict(adapter),
            **budget.settings(),
            "output_dir": str(root / label),
            "overwrite_output_dir": overwrite,
        }
        try:
            config = TrainConfig.from_dict(apply_overrides(data, per_label[label]))
        except DeltaTuneError as error:
            raise CompareError(f"method {label!r} cannot run in this comparison: {error}") from None
        plans.append(MethodPlan(label, method, config, tuple(per_label[label])))
    return base, plans


def _labelled_methods(entries: list[str]) -> dict[str, str]:
    """{label: registered method} of the `--methods` entries (`METHOD` or `LABEL=METHOD`), checked."""
    if not entries:
        raise CompareError("--methods names no method; give a comma-separated list such as lora,bitfit,full")
    labelled: dict[str, str] = {}
    for entry in entries:
        label, _, method = entry.rpartition("=")
        label = label or method
        problem = name_problem(label)  # it names a folder and prefixes --set items
        if problem is not None:
            raise CompareError(f"--methods label {label!r} {problem}; give a label without '.', '/' or ':'")
        if label in labelled:
            raise CompareError(f"--methods names {label} more than once; name each method once (or label each: a=lora)")
        get_method(method)  # an unknown name: the error lists the registered methods
        labelled[label] = method
    return labelled


def _method_overrides(method_overrides: list[str], labels: list[str]) -> dict[str, list[str]]:
    """{label: its `KEY=VALUE` overrides} from the `LABEL.KEY=VALUE` items of `--set`."""
    found: dict[str, list[str]] = {label: [] for label in labels}
    for item in method_overrides:
        method, dot, override = item.partition(".")
        key = override.partition("=")[0].strip().split(".")[0]
        if not dot or "=" not in override or not key:
            raise CompareError(f"bad --set {item!r}: write METHOD.KEY=VALUE, for example lora.learning_rate=1e-3")
        if method not in found:
            raise CompareError(f"--set {item!r} is for method {method!r}, which --methods does not name")
        if override.partition("=")[0].strip() == "adapter.method":
            raise CompareError(
                f"--set {item!r}: a row's method is the one --methods gives its label; write LABEL=METHOD in "
                f"--methods (for example {method}=METHOD) instead"
            )
        if key in SHARED_KEYS:
            raise CompareError(
                f"--set {item!r}: {key} is the same for every method of a comparison; set it in the config or as a "
                f"plain {key}=VALUE for all"
            )
        found[method].append(override)
    return found


def _check_output_dir(root: Path, labels: list[str], overwrite: bool) -> None:
    """Refuse a folder that holds another run (a comparison, a training run, a method's run) unless `overwrite`,
    and even then a compare file that is a link or not a file, and a method's folder whose run-named entries no
    run wrote (`outputs.check_replaceable`)."""
    check_no_links(root, COMPARE_FILES)
    found = [name for name in COMPARE_FILES if os.path.lexists(root / name)]
    folder = next((root / name for name in found if not (root / name).is_file()), None)
    if folder is not None:
        raise CompareError(
            f"{folder} is not a file: a comparison writes its results there; move it out of the folder, or give "
            "another output_dir"
        )
    found += previous_run(root)
    found += [f"{label}/" for label in labels if previous_run(root / label)]
    if found and not overwrite:
        raise CompareError(
            f"output_dir {root} already holds a run ({', '.join(found)}); pass --overwrite to replace it, or give "
            "another output_dir"
        )
    for label in labels:
        check_replaceable(root / label)


def check_methods_fit(base: TrainConfig, plans: list[MethodPlan]) -> None:
    """Attach every method to the config's base model once (and take it off again), so that a method that
    cannot run the config's model or task is refused before any method trains."""
    from ..model import DeltaModel
    from .data import read_records, subsample
    from .encode import label_names
    from .models import attach_adapter, load_model, load_tokenizer, model_folder
    from .tasks import get_task

    task = get_task(base.task)
    tokenizer = load_tokenizer(base.tokenizer or str(model_folder(base.model)))
    records = read_records(base.train_file, base.columns, base.table_layout())  # as training reads it
    labels = label_names(task.label_field, subsample(records, base.max_train_examples, base.seed))
    model = load_model(base.model, task, tokenizer, labels, base.quantize, quiet=True)  # each method's run says it
    for plan in plans:
        try:
            delta_model: DeltaModel = attach_adapter(model, plan.config.adapter_config(), task)
        except DeltaTuneError as error:
            raise CompareError(
                f"method {plan.label!r} cannot run this comparison's {base.task} task on {type(model).__name__}: "
                f"{error}"
            ) from None
        delta_model._withdraw("default")  # never trained: a full fine-tuning adapter's weights are still the base's
        delta_model.unload(merge=False)
