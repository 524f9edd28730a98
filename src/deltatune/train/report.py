"""What a run leaves in its output folder besides the adapter: `metrics.json` and `training.png`.

`metrics.json`: {"task", "method", "steps", "seconds", "trainable_parameters", "total_parameters",
"eval": final eval metrics, "history": [{"step", "loss", "learning_rate"} | {"step", "eval_<metric>"}]}
plus whatever the caller adds (the trainer adds "train_seconds", its training time alone, evaluations and saves
left out, and "config", every setting as the run resolved it, the method's defaults filled in; the demo adds
"before" and "after"); strict JSON, a non-finite number
(NaN, ±inf) written as null. The plot shows the training loss by step and, on a second axis, the
task's main eval metric. It needs matplotlib; without it the plot is skipped with a note.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..atomic import json_writer, write_files
from ..summary import TrainableSummary

METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"


def write_report(
    output_dir: Path,
    *,
    task: str,
    method: str,
    parameters: TrainableSummary,
    history: list[dict[str, float]],
    final_metrics: dict[str, float],
    seconds: float,
    main_metric: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `metrics.json` and the plot of `history` with `main_metric` into `output_dir`."""
    report = {
        "task": task,
        "method": method,
        "steps": max((entry["step"] for entry in history), default=0),
        "seconds": round(seconds, 2),
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
        "eval": final_metrics,
        "history": history,
        **(extra or {}),
    }
    write_files(output_dir, {METRICS_FILE: json_writer(finite_json(report))})
    plot_history(history, main_metric, output_dir / PLOT_FILE)


def finite_json(data: Any) -> Any:
    """`data` with every non-finite number (NaN, ±inf) as None: Python writes those as NaN and
    Infinity, which are not JSON and which other readers refuse."""
    return json.loads(json.dumps(data), parse_constant=lambda constant: None)


def plot_history(history: list[dict[str, float]], metric: str, path: Path) -> bool:
    """Loss (left axis) and `eval_<metric>` (right axis) by step, as a PNG. False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed: no plot written ({path.name}); pip install matplotlib")
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    scores = [(entry["step"], entry[f"eval_{metric}"]) for entry in history if f"eval_{metric}" in entry]
    figure, loss_axis = pyplot.subplots(figsize=(7, 4), dpi=100)
    if losses:
        loss_axis.plot(*zip(*losses), color="tab:blue", label="training loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if scores:
        metric_axis = loss_axis.twinx()
        metric_axis.plot(*zip(*scores), "o-", color="tab:orange", label=metric)
        metric_axis.set_ylabel(f"eval {metric}", color="tab:orange")
        metric_axis.set_ylim(-0.02, 1.02)
    figure.tight_layout()  # written to a new file that takes the name: never into a file (or link) there
    write_files(path.parent, {path.name: lambda staged: figure.savefig(staged, format="png")})
    pyplot.close(figure)
    return True


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A small text table of the metrics before and after training."""
    names = [name for name in before if name in after]
    width = max(map(len, names + ["metric"]))
    lines = [f"{'metric':<{width}}  {'before':>8}  {'after':>8}"]
    lines += [f"{name:<{width}}  {before[name]:>8.4f}  {after[name]:>8.4f}" for name in names]
    return "\n".join(lines)
