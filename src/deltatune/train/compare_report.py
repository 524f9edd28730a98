"""What `deltatune compare` leaves besides each method's own run: `compare.md`, `compare.json`, `compare.png`.

`compare.json`: {"config", "task", "metric", "eval_file", "budget", "seed", "device", "memory",
"methods": [row, ...]}, one row per method in the order compared, its figures read from the method's
own `metrics.json` (the metric, steps, seconds, parameter counts) and measured around its run (peak
memory, adapter bytes):

    label (the row's name: its --methods label, else the method), method, adapter (its config),
    overrides (its --set items), output_dir, metric (the --metric, else the task's main one), eval (every eval
    metric), trainable_parameters, total_parameters, trainable_percent, steps, wall_seconds (training
    and final evaluation: metrics.json's seconds), train_seconds (training alone), peak_memory_bytes
    (null where not measured) and memory_kind (`compare_memory`), adapter_bytes (the adapter folder's files),
    error (null, or why the run diverged or failed, in one line: then every figure is null), status
    ("trained", "diverged" or "failed": its run stopped for another reason than its training; see `compare`)

`compare.md` holds the same table as the one printed. `compare.png` (matplotlib; skipped with a note
without it) plots the metric against the trainable share of parameters on a log axis, each method's
marker area in proportion to its wall time and labelled with it.

The three are written together, each a new file that takes its name (`atomic.write_files`), compare.json
last. A comparison that replaces an earlier one removes the earlier one's files before its first method
trains (`remove_results`), so a comparison stopped before its end leaves no table at all rather than one
describing runs that its method folders no longer hold.
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import Any

from ..atomic import json_writer, write_files
from .report import finite_json

COMPARE_FILES = ("compare.md", "compare.json", "compare.png")

COLUMNS = (
    ("label", "method", "{}"),
    ("metric", "{metric}", "{:.4f}"),
    ("trainable_parameters", "trainable", "{:,}"),
    ("trainable_percent", "trainable %", "{:.4g}"),
    ("steps", "steps", "{}"),
    ("wall_seconds", "wall s", "{:.1f}"),
    ("peak_memory_bytes", "peak MiB", "mib"),
    ("adapter_bytes", "adapter bytes", "{:,}"),
)
"""(row key, column title, format) of the results table; "mib": bytes shown in MiB."""


def table(summary: dict[str, Any]) -> str:
    """The results table, as Markdown (it reads as plain text too)."""
    titles = [title.format(metric=summary["metric"]) for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    for row in summary["methods"]:
        lines.append("| " + " | ".join(_cell(row[key], shape) for key, _, shape in COLUMNS) + " |")
    lines += [f"\n{row['label']} ({row['status']}): {row['error']}" for row in summary["methods"] if row["error"]]
    return "\n".join(lines)


def _cell(value: Any, shape: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if shape == "mib":
        return f"{value / 2**20:.0f}"
    return shape.format(value)


def markdown(summary: dict[str, Any]) -> str:
    """`compare.md`: what was compared, under which budget, and the table."""
    return (
        f"# deltatune compare: {summary['task']}, {summary['metric']} on {summary['eval_file']}\n\n"
        f"Config `{summary['config']}`; budget {summary['budget']}; seed {summary['seed']}; device "
        f"{summary['device']} (peak memory: {summary['memory']}).\n\n{table(summary)}\n"
    )


def write_results(root: Path, summary: dict[str, Any]) -> None:
    """Write compare.png, compare.md and compare.json into `root`, together (see the module docstring)."""
    text = markdown(summary)
    image = plot(summary)
    plotted = {} if image is None else {"compare.png": lambda path: Path(path).write_bytes(image)}
    write_files(
        root,
        {
            **plotted,
            "compare.md": lambda path: Path(path).write_text(text, encoding="utf-8"),
            "compare.json": json_writer(finite_json(summary)),
        },
    )


def remove_results(root: Path) -> None:
    """Remove an earlier comparison's files from `root` (the output check found files there, never links)."""
    for name in COMPARE_FILES:
        (root / name).unlink(missing_ok=True)


def import_plotting() -> None:
    """Import matplotlib (if installed) before the methods run: each run's own plot imports it, and the ~25 MiB
    its import keeps resident would otherwise count in the first method's peak memory."""
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: F401


def plot(summary: dict[str, Any]) -> bytes | None:
    """The metric against the trainable % (log axis), marker area ∝ wall time, as PNG bytes. None without
    matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot written (compare.png); pip install matplotlib")
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [row for row in summary["methods"] if row["metric"] is not None and row["trainable_percent"] > 0]
    slowest = max((row["wall_seconds"] for row in rows), default=1.0) or 1.0
    figure, axis = pyplot.subplots(figsize=(7, 4.5), dpi=100)
    for row in rows:
        area = 40 + 460 * row["wall_seconds"] / slowest
        axis.scatter(row["trainable_percent"], row["metric"], s=area, alpha=0.6)
        axis.annotate(
            f"{row['label']} ({row['wall_seconds']:.3g} s)",
            (row["trainable_percent"], row["metric"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    axis.set_xscale("log")
    shares = [row["trainable_percent"] for row in rows]
    if shares:  # room for the labels right of the markers
        axis.set_xlim(min(shares) / 2, max(shares) * 4)
    axis.set_xlabel("trainable parameters (% of the model, log scale)")
    axis.set_ylabel(f"eval {summary['metric']}")
    axis.set_title(f"{summary['task']}: {summary['budget']} (marker area: wall time)", fontsize=9)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    pyplot.close(figure)
    return image.getvalue()
