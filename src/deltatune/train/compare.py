"""`deltatune compare`: which method for my task, and how close to full fine-tuning does it get?

    deltatune compare run.yaml --methods lora,bottleneck,bitfit,prompt_tuning,full
        [--max-steps N | --epochs E | --time-budget SECONDS] [--set lora.learning_rate=1e-3 ...]
        [--overwrite] [--quiet] [key=value ...]

Every method trains on the same data, with the same budget and seed (`compare_plan`: how each
method's config is made and what is refused before anything trains), through `deltatune train`'s own
run (`loop.train`: the same loop, metrics and files, each method from a freshly loaded base), one after
the other in this process: a bar over the methods stands above each run's own bars. Each method's run
stays in `OUTPUT_DIR/<label>/` (its adapter, metrics.json, plot); its peak memory is measured around
its run (`compare_memory`). A method whose training diverges (`TrainingDivergedError`: its learning rate
too high, say) is a result, not the end of the comparison: its row keeps the error and no figures, and
the next method runs. A method whose run fails otherwise (its final evaluation, after its adapter was
saved; an out-of-memory error) does not end it either: a comparison of several methods can take hours,
and the methods that finish, before and after it, are what the user came for. Its row is marked
failed, with the one-line reason and no figures, and the next method runs. Then the results table is
printed and written with the plot (`compare_report`: compare.md, compare.json, compare.png). Once they
are written, a comparison with a failed method fails (`CompareError`, exit status 2: its table is
incomplete for a reason to fix, not a result), and one in which every method diverged, where nothing
was compared, fails with `TrainingDivergedError` (exit status 2, as `deltatune train` on a divergence).
A Ctrl-C stops the comparison at once. An earlier comparison's compare files that `--overwrite` replaces are
removed once every check has passed, before the first method trains (`compare_report.remove_results`): a
comparison stopped before its end leaves no table describing runs that its method folders no longer hold.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import DeltaTuneError, TrainingDivergedError
from .checkpoint import ADAPTER_FOLDER
from .compare_memory import measure_peak
from .compare_plan import Budget, CompareError, MethodPlan, check_methods_fit, plan_comparison
from .compare_report import import_plotting, remove_results, table, write_results
from .config import TrainConfig
from .distributed import ranks_from_environment
from .loop import choose_device, train
from .output_lock import output_lock
from .report import METRICS_FILE
from .tasks import get_task


@dataclasses.dataclass
class CompareOptions:
    """A comparison as `deltatune compare` takes it."""

    config: str | Path
    """The YAML training config every method starts from."""
    methods: list[str]
    """Registered method names (or `LABEL=METHOD`), in the order they run and are listed."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """`key=value` overrides for every method."""
    method_overrides: list[str] = dataclasses.field(default_factory=list)
    """`LABEL.KEY=VALUE` overrides, each for one compared method (its label in --methods)."""
    budget: Budget = dataclasses.field(default_factory=Budget)
    metric: str | None = None
    """The eval metric the table and the plot show (every metric is in compare.json): one of the task's
    metrics or "loss"; None: the task's main metric (accuracy, exact_match, ...)."""
    overwrite: bool = False
    """Replace an earlier run in the output folder."""
    progress: bool = True


def compare(options: CompareOptions) -> dict[str, Any]:
    """Run the comparison; returns what compare.json holds (and prints the table). Raises, once the results
    are written, `CompareError` if a method failed and `TrainingDivergedError` if every method diverged."""
    if ranks_from_environment().distributed:
        raise CompareError("deltatune compare runs in one process; start it without torchrun")
    base, plans = plan_comparison(
        options.config, options.methods, options.overrides, options.method_overrides, options.budget, options.overwrite
    )
    with output_lock(Path(base.output_dir)):  # each method's run locks its own folder inside
        return _run_comparison(options, base, plans)


def _run_comparison(options: CompareOptions, base: TrainConfig, plans: list[MethodPlan]) -> dict[str, Any]:
    """The comparison once planned (see `compare`), its output folder locked."""
    metric = chosen_metric(base.task, options.metric)
    check_methods_fit(base, plans)
    import_plotting()
    remove_results(Path(base.output_dir))  # the earlier comparison's, which --overwrite replaces
    bar = tqdm(total=len(plans), unit="method", disable=not options.progress, dynamic_ncols=True)
    rows = []
    for plan in plans:
        bar.set_description(f"compare: {plan.label}")
        adapter = str(Path(plan.config.output_dir) / ADAPTER_FOLDER)
        again = shlex.join(["deltatune", "eval", str(options.config), *options.overrides, "--adapter", adapter])
        rows.append(run_method(plan, options.budget, metric, options.progress, again))
        bar.update(1)
    bar.close()
    summary = {
        "config": str(options.config),
        "task": base.task,
        "metric": metric,
        "eval_file": str(base.eval_file),
        "budget": options.budget.describe(plans[0].config),
        "seed": base.seed,
        "device": str(choose_device(base.device, ranks_from_environment())),
        "memory": next((row["memory_kind"] for row in rows if row["memory_kind"]), "not measured"),
        "methods": rows,
    }
    write_results(Path(base.output_dir), summary)
    print(table(summary))
    print(f"results in {Path(base.output_dir)}: compare.md, compare.json, compare.png; each method's run in its folder")
    failed = [row["label"] for row in rows if row["status"] == FAILED]
    if failed:
        raise CompareError(
            f"{', '.join(failed)} failed, so the comparison is incomplete; the other methods' results and each "
            f"failure's reason are in {Path(base.output_dir) / 'compare.md'}: fix the cause and compare those again"
        )
    if all(row["error"] for row in rows):
        raise TrainingDivergedError(
            f"every compared method diverged ({', '.join(row['label'] for row in rows)}), so nothing was compared; "
            f"their errors are in {Path(base.output_dir) / 'compare.md'}: lower the learning rate and run it again"
        )
    return summary


FIGURES = (
    "metric",
    "trainable_parameters",
    "total_parameters",
    "trainable_percent",
    "steps",
    "wall_seconds",
    "train_seconds",
    "peak_memory_bytes",
    "memory_kind",
    "adapter_bytes",
)
"""The figures of a row, none of which a diverged or failed run has."""
TRAINED, DIVERGED, FAILED = "trained", "diverged", "failed"
"""A row's status: its method trained and was evaluated, diverged (a result), or failed (its `error` says why)."""


def chosen_metric(task_name: str, metric: str | None) -> str:
    """`metric` if the task computes it ("loss" or one of its metrics), the task's main metric for None."""
    task = get_task(task_name)
    if metric is None:
        return task.main_metric
    known = ["loss", *task.metrics]
    if metric not in known:
        raise CompareError(f"--metric {metric!r} is not computed for {task_name}; use one of {', '.join(known)}")
    return metric


def run_method(plan: MethodPlan, budget: Budget, metric: str, progress: bool, evaluate_again: str) -> dict[str, Any]:
    """Train one method (`loop.train`) and read its row from its own metrics.json and adapter folder; a
    run that diverged or failed gives a row with its status, its one-line error and no figures.
    `evaluate_again`: the command that evaluates its adapter (the advice of a failed final evaluation)."""
    device = choose_device(plan.config.device, ranks_from_environment())
    row = {
        "label": plan.label,
        "method": plan.method,
        "adapter": plan.config.adapter_config().to_dict(),
        "overrides": list(plan.overrides),
        "output_dir": plan.config.output_dir,
        "error": None,
        "status": TRAINED,
    }
    try:
        with measure_peak(device) as peak:
            train(plan.config, progress=progress, time_budget=budget.seconds, evaluate_again=evaluate_again)
    except TrainingDivergedError as error:
        return _without_figures(row, DIVERGED, str(error))
    except DeltaTuneError as error:  # already one line: a final evaluation that failed says where the adapter is
        return _without_figures(row, FAILED, str(error))
    except Exception as error:  # an out-of-memory error, say: one method's failure, the next may run
        return _without_figures(row, FAILED, f"{type(error).__name__}: {error}".splitlines()[0])
    output_dir = Path(plan.config.output_dir)
    metrics = json.loads((output_dir / METRICS_FILE).read_text(encoding="utf-8"))
    adapter = output_dir / ADAPTER_FOLDER
    return {
        **row,
        "metric": metrics["eval"].get(metric),
        "eval": metrics["eval"],
        "trainable_parameters": metrics["trainable_parameters"],
        "total_parameters": metrics["total_parameters"],
        "trainable_percent": 100.0 * metrics["trainable_parameters"] / metrics["total_parameters"],
        "steps": metrics["steps"],
        "wall_seconds": metrics["seconds"],
        "train_seconds": metrics["train_seconds"],
        "peak_memory_bytes": peak.bytes,
        "memory_kind": peak.kind,
        "adapter_bytes": sum(path.stat().st_size for path in adapter.rglob("*") if path.is_file()),
    }


def _without_figures(row: dict[str, Any], status: str, error: str) -> dict[str, Any]:
    """The row of a method that diverged or failed: its status and error, no figures (said above its bars)."""
    tqdm.write(f"{row['label']} ({status}): {error}")
    return {**row, **dict.fromkeys(FIGURES), "eval": {}, "error": error, "status": status}
