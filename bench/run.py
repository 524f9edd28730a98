"""deltatune against peft (and AdapterHub), side by side, in one run: `make bench`.

Every measurement runs each library alone in a fresh worker process (workloads.py: its peak memory
and a standalone time), then all its libraries together in one more worker whose calls alternate
between them. Each time ratio is the median over the repeats of the ratio of one repeat's
back-to-back calls, so that both sides of every ratio meet the same machine load. It prints the
ratios deltatune / reference beside the targets and writes bench/results.json.
`--quick` uses a tiny model and few repeats: a smoke test of the whole suite, not a measurement. It
runs the workloads of this environment inside this process (starting ~20 worker processes, each
importing torch, transformers and peft, was what made the smoke test slow on a loaded machine); only
the AdapterHub workload still goes through a worker, since it needs the other environment: one worker
for all its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
REPOSITORY = HERE.parent


@dataclass(frozen=True)
class Measurement:
    name: str
    workload: str
    options: dict[str, Any] = field(default_factory=dict)
    libraries: tuple[str, ...] = ("deltatune", "peft")
    environment: str = "main"
    paired: bool = True
    """Time the libraries side by side in one process (False: workloads that time one-off events)."""


@dataclass(frozen=True)
class Target:
    """A ratio computed from the results, the bound the issue sets, and what it means."""

    label: str
    ratio: Callable[[dict[str, dict[str, Any]]], float]
    bound: float
    context: Callable[[dict[str, dict[str, Any]]], str] = lambda results: ""


SUITE = [
    Measurement("train_dropout", "train", {"dropout": 0.05}),
    Measurement("train_no_dropout", "train", {"dropout": 0.0}),
    Measurement("train_tail_labels", "train", {"dropout": 0.05, "labelled_tail": 16}),
    Measurement("forward", "forward", libraries=("base", "deltatune", "peft")),
    Measurement("mixed", "mixed"),
    Measurement("add_and_merge", "add_and_merge", {"adapters": 100}, paired=False),
    Measurement("houlsby", "houlsby", libraries=("deltatune", "adapterhub", "floor"), environment="adapterhub"),
    Measurement("prefix", "prefix", libraries=("deltatune", "peft", "floor")),
    Measurement(
        "train_nf4",
        "train",
        {"dropout": 0.05, "quantize": "nf4", "checkpointing": True, "release_freed_memory": True},
    ),
    Measurement(
        "train_fp32_checkpoint",
        "train",
        {"dropout": 0.05, "quantize": None, "checkpointing": True, "release_freed_memory": True},
        paired=False,
    ),
]


def _seconds(results: dict, measurement: str, library: str, key: str = "seconds") -> float:
    return results[measurement][library][key]


def _paired(
    results: dict, measurement: str, library: str, reference: str, key: str = "seconds", reference_key: str = "seconds"
) -> float:
    """Median over the repeats of (library's call / the reference's call of the same repeat): calls of
    one repeat run back to back, so the ratio of each pair cancels the machine's slower drifts."""
    ours, theirs = results[measurement][library][f"{key}_all"], results[measurement][reference][f"{reference_key}_all"]
    return statistics.median(mine / other for mine, other in zip(ours, theirs))


def _add_ratio(results: dict, library: str) -> float:
    """Seconds of the last add over the first, of the add-and-merge workload."""
    return _seconds(results, "add_and_merge", library, "last_add_seconds") / _seconds(
        results, "add_and_merge", library, "first_add_seconds"
    )


def _with_load(results: dict, measurement: str, library: str) -> float:
    return _seconds(results, measurement, library, "peak_with_load_bytes")


def _step_with_weights(results: dict, measurement: str, library: str) -> float:
    """The peak over the timed steps with the model resident, above the memory after imports: the
    load's own transient peak (the float32 checkpoint's pages read while quantizing) left out."""
    return _seconds(results, measurement, library, "step_peak_with_weights_bytes")


def _step_memory(results: dict, measurement: str, library: str) -> float:
    return _seconds(results, measurement, library, "peak_added_bytes")


TARGETS = [
    Target(
        "LoRA train step, dropout 0.05: time vs peft", lambda r: _paired(r, "train_dropout", "deltatune", "peft"), 0.80
    ),
    Target(
        "LoRA train step, dropout 0.05: peak memory vs peft",
        lambda r: _step_memory(r, "train_dropout", "deltatune") / _step_memory(r, "train_dropout", "peft"),
        0.90,
    ),
    Target(
        "LoRA train step, dropout 0: time vs peft", lambda r: _paired(r, "train_no_dropout", "deltatune", "peft"), 0.95
    ),
    Target(
        "LoRA train step, labels on last 16 tokens: time vs peft",
        lambda r: _paired(r, "train_tail_labels", "deltatune", "peft"),
        0.65,
    ),
    Target(
        "unmerged LoRA forward vs base model",
        lambda r: _paired(r, "forward", "deltatune", "base"),
        1.05,
        lambda r: f"peft: {_paired(r, 'forward', 'peft', 'base'):.3f}",
    ),
    Target(
        "mixed batch of 4 adapters vs single-adapter forward",
        lambda r: _paired(r, "mixed", "deltatune", "deltatune", reference_key="single_seconds"),
        1.10,
        lambda r: f"peft: {_paired(r, 'mixed', 'peft', 'peft', reference_key='single_seconds'):.3f}",
    ),
    Target("mixed batch of 4 adapters: time vs peft", lambda r: _paired(r, "mixed", "deltatune", "peft"), 0.85),
    Target(
        "adding the 100th adapter vs the 1st",
        lambda r: _add_ratio(r, "deltatune"),
        1.5,
        lambda r: f"peft: {_add_ratio(r, 'peft'):.2f}",
    ),
    Target(
        "merge LoRA on all 7 linear layers (seconds)",
        lambda r: _seconds(r, "add_and_merge", "deltatune", "merge_seconds"),
        0.3,
        lambda r: f"peft: {_seconds(r, 'add_and_merge', 'peft', 'merge_seconds'):.3f} s",
    ),
    Target(
        "Houlsby adapter train step vs AdapterHub",
        lambda r: _paired(r, "houlsby", "deltatune", "adapterhub"),
        0.90,
        lambda r: f"floor: {_paired(r, 'houlsby', 'floor', 'adapterhub'):.3f}",
    ),
    Target(
        "prefix tuning train step vs peft",
        lambda r: _paired(r, "prefix", "deltatune", "peft"),
        0.90,
        lambda r: f"floor: {_paired(r, 'prefix', 'floor', 'peft'):.3f}",
    ),
    Target(
        "LoRA train step, nf4 base: step peak, weights resident, vs fp32",
        lambda r: (
            _step_with_weights(r, "train_nf4", "deltatune")
            / _step_with_weights(r, "train_fp32_checkpoint", "deltatune")
        ),
        0.5,
        lambda r: (
            f"{_step_with_weights(r, 'train_nf4', 'deltatune') / 2**20:.0f} / "
            f"{_step_with_weights(r, 'train_fp32_checkpoint', 'deltatune') / 2**20:.0f} MiB; peft: "
            f"{_step_with_weights(r, 'train_nf4', 'peft') / _step_with_weights(r, 'train_fp32_checkpoint', 'peft'):.3f}"
            "; with the load: "
            f"{_with_load(r, 'train_nf4', 'deltatune') / _with_load(r, 'train_fp32_checkpoint', 'deltatune'):.3f}"
        ),
    ),
    Target(
        "LoRA train step, nf4 base: time vs peft",
        lambda r: _paired(r, "train_nf4", "deltatune", "peft"),
        1.0,
        lambda r: f"{_seconds(r, 'train_nf4', 'deltatune'):.2f} / {_seconds(r, 'train_nf4', 'peft'):.2f} s",
    ),
    Target(
        "LoRA train step, nf4 base: step peak, weights resident, vs peft",
        lambda r: _step_with_weights(r, "train_nf4", "deltatune") / _step_with_weights(r, "train_nf4", "peft"),
        0.9,
        lambda r: (
            f"{_step_with_weights(r, 'train_nf4', 'deltatune') / 2**20:.0f} / "
            f"{_step_with_weights(r, 'train_nf4', 'peft') / 2**20:.0f} MiB; with the load: "
            f"{_with_load(r, 'train_nf4', 'deltatune') / _with_load(r, 'train_nf4', 'peft'):.3f}"
        ),
    ),
]


def run_workers(
    python: str, measurement: Measurement, runs: list[tuple[tuple[str, ...], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The results of `runs` (libraries, options), in order: in this process where quick mode allows it;
    else each in a fresh worker, or in quick mode all in one worker (each start imports torch,
    transformers and peft: ~10 s of CPU, a smoke test's main cost)."""
    options = runs[0][1]
    if options.get("in_process") and python == sys.executable:
        return [_run_here(measurement, libraries, run_options) for libraries, run_options in runs]
    if options.get("quick"):
        return _run_worker(python, measurement, runs)
    return [result for run in runs for result in _run_worker(python, measurement, [run])]


def _run_worker(
    python: str, measurement: Measurement, runs: list[tuple[tuple[str, ...], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One worker process running `runs` one after the other (workloads.py prints a JSON line each)."""
    command = [python, str(HERE / "workloads.py"), measurement.workload]
    for libraries, options in runs:
        command += [",".join(libraries), json.dumps({**options, **measurement.options})]
    environment = {**os.environ, "OMP_NUM_THREADS": str(runs[0][1]["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=environment)
    if finished.returncode != 0:
        names = " / ".join(",".join(libraries) for libraries, _ in runs)
        raise RuntimeError(f"{measurement.name} / {names} failed:\n{finished.stderr[-3000:]}")
    return [json.loads(line) for line in finished.stdout.strip().splitlines()[-len(runs) :]]


def _run_here(measurement: Measurement, libraries: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    """The worker's `run`, called in this process; the JSON round trip keeps its results as a worker's."""
    sys.path.insert(0, str(HERE))
    import workloads

    torch.manual_seed(0)
    return json.loads(
        json.dumps(workloads.run(measurement.workload, list(libraries), {**options, **measurement.options}))
    )


def measure(measurement: Measurement, python: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per library: peak memory and standalone time from its own run; with `paired`, the time from
    the shared run replaces "seconds" (the standalone one stays as "alone_seconds")."""
    runs = [((library,), options["alone"]) for library in measurement.libraries]
    if measurement.paired:
        runs.append((measurement.libraries, options["paired"]))
    results = run_workers(python, measurement, runs)
    alone = dict(zip(measurement.libraries, results))
    if not measurement.paired:
        return alone
    paired = results[-1]
    return {
        library: {**alone[library], "alone_seconds": alone[library]["seconds"], **paired[library]}
        for library in measurement.libraries
    }


def _missing_backend(measurement: Measurement) -> str:
    """Why a quantized measurement cannot run here (its backend package is missing), or ""."""
    if not measurement.options.get("quantize"):
        return ""
    from deltatune.errors import DeltaTuneError
    from deltatune.train.quantize import require_backend

    try:
        require_backend(measurement.options["quantize"])
    except DeltaTuneError as error:
        return str(error)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per library in the paired worker (default 9, quick 2)"
    )
    parser.add_argument("--only", default="", help="comma-separated measurement names")
    parser.add_argument("--adapterhub-python", default=str(REPOSITORY / ".venv-transformers457" / "bin" / "python"))
    parser.add_argument("--out", default=str(HERE / "results.json"))
    arguments = parser.parse_args(argv)
    common = {"quick": arguments.quick, "threads": arguments.threads, "in_process": arguments.quick}
    options = {
        "alone": {**common, "warmup": 1, "repeats": 1 if arguments.quick else 3},
        "paired": {
            **common,
            "warmup": 1 if arguments.quick else 2,
            "repeats": arguments.repeats or (2 if arguments.quick else 9),
        },
    }
    pythons = {"main": sys.executable, "adapterhub": arguments.adapterhub_python}
    wanted = set(filter(None, arguments.only.split(",")))
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for measurement in SUITE:
        if wanted and measurement.name not in wanted:
            continue
        if not Path(pythons[measurement.environment]).exists():
            skipped[measurement.name] = (
                f"no Python at {pythons[measurement.environment]} (run make test once to build it)"
            )
            continue
        missing = _missing_backend(measurement)
        if missing:
            skipped[measurement.name] = missing
            continue
        options_here = (
            {mode: {**values, "adapters": 5} for mode, values in options.items()} if arguments.quick else options
        )
        print(f"measuring {measurement.name} ...", flush=True)
        results[measurement.name] = measure(measurement, pythons[measurement.environment], options_here)
    report = summarise(results, skipped, arguments)
    Path(arguments.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


def summarise(results: dict, skipped: dict[str, str], arguments: argparse.Namespace) -> dict[str, Any]:
    ratios = []
    for target in TARGETS:
        try:
            value, context = target.ratio(results), target.context(results)
        except KeyError:
            continue
        except ZeroDivisionError:  # quick mode measures memory in-process: a tiny model may add no page
            continue
        ratios.append(
            {
                "label": target.label,
                "value": value,
                "bound": target.bound,
                "met": value <= target.bound,
                "context": context,
            }
        )
    return {
        "mode": "quick" if arguments.quick else "full",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": arguments.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "targets": ratios,
        "skipped": skipped,
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['mode']} run, {report['machine']['threads']} threads, torch {report['machine']['torch']}")
    print(f"{'measure':<58} {'value':>8} {'target':>8}  met  reference")
    for row in report["targets"]:
        print(
            f"{row['label']:<58} {row['value']:>8.3f} {'≤ ' + format(row['bound'], 'g'):>8}  "
            f"{'yes' if row['met'] else 'NO ':<4} {row['context']}"
        )
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    sys.exit(main())
