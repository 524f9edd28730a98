"""The whole-run benchmark: `deltatune train` against peft + transformers `Trainer` and TRL `SFTTrainer`
with packing, each training LoRA (r=16 on every linear layer) on the same E2E records with the same
hyperparameters, one system at a time, each in its own process (whole_run_systems.py). Then one
evaluator (whole_run_eval.py) loads every saved adapter onto the same base and computes the same
held-out loss. Last, the peak memory of a few steps at max_length 1024 (deltatune and peft + Trainer).

    python bench/whole_run.py                      # the full run: 1,000 examples, writes results-whole-run.json
    python bench/whole_run.py --examples 200       # a reduced run (its results go to --out only)
    python bench/whole_run.py --quick              # a tiny Llama, 50 examples: a smoke test, not a measurement
    python bench/whole_run.py --deltatune packing=true --deltatune group_by_length=true

The memory measure at 1024: records of about 1,000 tokens each (consecutive E2E records joined:
representations as the prompt, texts as the completion), so a padded batch of them is [batch, ~1024]
with almost no padding and a packed row holds one of them: both systems see the same real tokens in
tensors of the same shape, and what differs is what each keeps alive in a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from whole_run_data import (  # noqa: E402
    EVAL_SOURCE,
    TRAIN_SOURCE,
    e2e_records,
    long_records,
    split_tokenization_mismatches,
    token_counts,
    write_jsonl,
)
from whole_run_spec import RunSpec, full_model_folder, tiny_model_folder, worker_environment  # noqa: E402

SYSTEMS = ("deltatune", "peft-trainer", "trl-packing")
MEMORY_SYSTEMS = ("deltatune", "peft-trainer")
FULL = {"examples": 1000, "eval_examples": 200}
RESULTS = HERE / "results-whole-run.json"
TARGETS = (
    ("wall time deltatune / peft + Trainer", "run_seconds", "deltatune", "peft-trainer", 0.6),
    ("wall time deltatune / TRL packing", "run_seconds", "deltatune", "trl-packing", 0.9),
    ("eval loss |deltatune - peft + Trainer| / peft + Trainer", "eval_loss", "deltatune", "peft-trainer", 0.02),
    ("eval loss |deltatune - TRL packing| / TRL packing", "eval_loss", "deltatune", "trl-packing", 0.02),
    ("peak memory at 1024 deltatune / peft + Trainer", "memory_1024_bytes", "deltatune", "peft-trainer", 0.6),
)
"""(label, figure, ours, theirs, bound): time and memory as ratios, the eval loss as a relative gap."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 50 examples: a smoke test")
    parser.add_argument("--examples", type=int, help="training examples (default 1000; quick: 50)")
    parser.add_argument("--eval-examples", type=int, help="held-out examples (default 200; quick: 20)")
    parser.add_argument(
        "--deltatune", action="append", default=[], metavar="KEY=VALUE", help="an extra `deltatune train` override"
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--packed-rows", type=int, help="TRL rows per step (default: the tokens of a padded batch)")
    parser.add_argument("--memory-batch", type=int, default=1, help="rows per step of the 1024 memory measure")
    parser.add_argument("--memory-steps", type=int, help="steps of the 1024 memory measure (default 2; quick: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1024 memory measure")
    parser.add_argument(
        "--work", type=Path, help="folder for the data, adapters and logs (default: a new temporary one)"
    )
    parser.add_argument("--out", type=Path, help=f"results JSON (default: {RESULTS.name} for the full run only)")
    arguments = parser.parse_args(argv)
    arguments.examples = arguments.examples or (50 if arguments.quick else FULL["examples"])
    arguments.eval_examples = arguments.eval_examples or (20 if arguments.quick else FULL["eval_examples"])
    arguments.memory_steps = arguments.memory_steps or (1 if arguments.quick else 2)
    missing = [package for package in ("trl", "datasets") if importlib.util.find_spec(package) is None]
    if "trl-packing" in arguments.systems and missing:
        parser.error(
            f"trl-packing needs {' and '.join(missing)}: pip install -e '.[bench]' (or make bench-whole-run), "
            "or leave it out with --systems deltatune peft-trainer"
        )
    arguments.full = (
        not arguments.quick
        and not arguments.no_memory
        and set(arguments.systems) == set(SYSTEMS)
        and all(getattr(arguments, key) == value for key, value in FULL.items())
    )
    return arguments


def run_worker(script: str, arguments: list[str], threads: int, log: Path) -> float:
    """Run a worker script in its own process, its output to `log`; its wall time in seconds."""
    started = time.perf_counter()
    with log.open("w") as output:
        completed = subprocess.run(
            [sys.executable, str(HERE / script), *arguments],
            env=worker_environment(threads),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    if completed.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(
            f"{script} {' '.join(arguments[:1])} failed (status {completed.returncode}); log {log}:\n{tail}"
        )
    return time.perf_counter() - started


def run_system(system: str, spec: RunSpec, work: Path, label: str) -> dict[str, Any]:
    spec_path = spec.write(work / f"{label}-{system}-spec.json")
    result_path = work / f"{label}-{system}-result.json"
    print(f"  {label}: {system} ...", flush=True)
    process_seconds = run_worker(
        "whole_run_systems.py", [system, str(spec_path), str(result_path)], spec.threads, work / f"{label}-{system}.log"
    )
    result = json.loads(result_path.read_text())
    result["process_seconds"] = process_seconds
    print(f"    {result['run_seconds']:.1f} s, {result['steps']} steps, +{result['peak_added_bytes'] / 2**20:.0f} MiB")
    return result


def packed_rows(arguments: argparse.Namespace, spec: RunSpec, counts: dict[str, int]) -> int:
    """TRL's rows per step: as given, else the rows that hold the real tokens of a padded batch."""
    if arguments.packed_rows:
        return arguments.packed_rows
    return max(1, round(spec.batch_size * counts["tokens"] / arguments.examples / spec.max_length))


def measure(arguments: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model = tiny_model_folder() if arguments.quick else full_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    train = e2e_records(TRAIN_SOURCE, arguments.examples)
    held_out = write_jsonl(e2e_records(EVAL_SOURCE, arguments.eval_examples), work / "eval.jsonl")
    base = RunSpec(
        model=str(model),
        deltatune_model=str(model) if arguments.quick else "smollm2",
        train_file=str(write_jsonl(train, work / "train.jsonl")),
        output_dir="",
        deltatune_overrides=arguments.deltatune,
    )
    counts = token_counts(tokenizer, train, base.max_length)
    base.packed_rows = packed_rows(arguments, base, counts)
    report: dict[str, Any] = {
        "data": {
            "train": f"{TRAIN_SOURCE} ({arguments.examples} examples)",
            "eval": f"{EVAL_SOURCE} ({arguments.eval_examples} examples)",
            **counts,
            "split_tokenization_mismatches": split_tokenization_mismatches(tokenizer, train),
        },
        "spec": base.public(),
        "systems": {},
    }
    print(f"whole run: {arguments.examples} examples, {counts['tokens']} tokens; model {model}", flush=True)
    for system in arguments.systems:
        spec = dataclasses.replace(base, output_dir=str(work / system))
        report["systems"][system] = run_system(system, spec, work, "run")
        report["systems"][system]["tokens_per_second"] = (
            counts["tokens"] * spec.epochs / report["systems"][system]["run_seconds"]
        )
    adapters = write_json(
        work / "adapters.json", {system: str(work / system / "adapter") for system in arguments.systems}
    )
    print("  evaluating every adapter ...", flush=True)
    spec_path = base.write(work / "eval-spec.json")
    run_worker(
        "whole_run_eval.py",
        [str(spec_path), str(held_out), str(adapters), str(work / "eval.json")],
        base.threads,
        work / "eval.log",
    )
    evaluated = json.loads((work / "eval.json").read_text())
    report["base_eval_loss"] = evaluated.pop("base")["eval_loss"]
    for system, figures in evaluated.items():
        report["systems"][system].update(figures)
    if not arguments.no_memory:
        report["memory_1024"] = measure_memory(arguments, base, train, tokenizer, work)
        for system, figures in report["memory_1024"].items():
            report["systems"].setdefault(system, {})["memory_1024_bytes"] = figures["peak_added_bytes"]
    return report


def measure_memory(
    arguments: argparse.Namespace, base: RunSpec, train: list[dict[str, str]], tokenizer: Any, work: Path
) -> dict[str, Any]:
    """Peak memory of `memory_steps` steps of `memory_batch` records of ~1024 tokens each."""
    wanted, source = arguments.memory_batch * arguments.memory_steps, list(train)
    joined = long_records(source, tokenizer, 1024)
    while len(joined) < wanted:
        source += train
        joined = long_records(source, tokenizer, 1024)
    records = joined[:wanted]
    spec = dataclasses.replace(
        base,
        train_file=str(write_jsonl(records, work / "train-1024.jsonl")),
        max_length=1024,
        batch_size=arguments.memory_batch,
        packed_rows=arguments.memory_batch,
        max_steps=arguments.memory_steps,
    )
    counts = token_counts(tokenizer, records, 1024)
    print(f"memory at 1024: {wanted} records, longest {counts['longest']} tokens", flush=True)
    results = {}
    for system in (name for name in MEMORY_SYSTEMS if name in arguments.systems):
        results[system] = run_system(
            system, dataclasses.replace(spec, output_dir=str(work / f"{system}-1024")), work, "memory"
        )
        results[system]["records"] = counts
    return results


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "trl", "datasets", "deltatune"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def target_rows(systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, figure, ours, theirs, bound in TARGETS:
        if figure not in systems.get(ours, {}) or figure not in systems.get(theirs, {}):
            continue
        mine, other = systems[ours][figure], systems[theirs][figure]
        value = abs(mine - other) / other if figure == "eval_loss" else mine / other
        rows.append({"label": label, "value": value, "bound": bound, "met": value <= bound})
    return rows


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{'system':<14} {'wall s':>8} {'process s':>10} {'steps':>6} {'tokens/s':>9} {'peak MiB':>9} "
        f"{'eval loss':>10} {'1024 MiB':>9}"
    )
    for system, figures in report["systems"].items():

        def shown(key: str, form: str, scale: float = 1.0) -> str:
            return format(figures[key] / scale, form) if key in figures else "-"

        print(
            f"{system:<14} {shown('run_seconds', '8.1f')} {shown('process_seconds', '10.1f')} {shown('steps', '6.0f')} "
            f"{shown('tokens_per_second', '9.0f')} {shown('peak_added_bytes', '9.0f', 2**20)} "
            f"{shown('eval_loss', '10.4f')} {shown('memory_1024_bytes', '9.0f', 2**20)}"
        )
    print(f"(base model eval loss {report['base_eval_loss']:.4f})")
    for row in report["targets"]:
        print(
            f"  {row['label']:<58} {row['value']:7.3f}  target <= {row['bound']}  {'met' if row['met'] else 'NOT met'}"
        )


def main(argv: list[str] | None = None) -> int:
    arguments = parse(argv)
    work = arguments.work or Path(tempfile.mkdtemp(prefix="deltatune-whole-run."))
    work.mkdir(parents=True, exist_ok=True)
    report = measure(arguments, work)
    report["targets"] = target_rows(report["systems"])
    report["mode"] = "quick" if arguments.quick else "full" if arguments.full else "reduced"
    report["machine"] = {"platform": platform.platform(), "python": platform.python_version(), **versions()}
    print_report(report)
    out = arguments.out or (RESULTS if arguments.full else work / "results.json")
    write_json(out, report)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
