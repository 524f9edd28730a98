"""Done-when 6 of issue 12: the demo task trained on SmolLM2-135M-Instruct (a) from the fp32 checkpoint
converted from its GGUF file and (b) from the Q4_1 GGUF file itself with the linear weights and the token
embedding kept in their blocks (`quantize: gguf`, `deltatune.gguf`).

Each run is `deltatune demo` as it ships (its generated records, LoRA r=8 on the upper half of the blocks,
40 steps of 8 at 2e-3, the chat template, greedy exact match on 64 held-out examples), in its own process,
without the demo's evaluations between steps (`SHARED`). Peak memory is that process's resident-set
high-water mark (VmHWM) over load, the base model's evaluation, training and the final evaluation, minus
its resident set after the imports: the model is included, which is the point. Targets: peak ratio
(b)/(a) ≤ 0.4; exact match of (b) within 0.05 of (a).

    nice python bench/gguf_base.py            # both runs, one after the other (several minutes each)
    python bench/gguf_base.py --variant gguf  # one run, printing its JSON line (what the parent reads)
    python bench/gguf_base.py --variant gguf --load-only  # up to the loaded model only: the load's peak
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from measure import current_memory_bytes, peak_memory_bytes

HERE = Path(__file__).parent
SHARED = ["eval_every=null"]
"""Overrides both runs take: only the base model's and the final evaluation (the demo also evaluates at steps
10, 20 and 30, which changes nothing in training; generating through layers that dequantize at every token is
slow on 2 cores)."""
VARIANTS = {"gguf": ["quantize=gguf", *SHARED], "fp32": SHARED}
"""Run name → the demo's config overrides (the GGUF run first: it is the one that may fail)."""
TARGET_RATIO, TARGET_GAP = 0.4, 0.05
MIB = 1 << 20


def _tensor_bytes(module: Any) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _Loaded(Exception):
    """Ends a `--load-only` run once the demo's model is loaded and its adapter attached."""


def run_variant(
    variant: str, out: Path, steps: int | None, examples: int | None, load_only: bool = False
) -> dict[str, Any]:
    """One demo run in this process (up to the loaded model with `load_only`); memory in MiB above the
    resident set after the imports."""
    import torch

    from deltatune.train import loop
    from deltatune.train.demo import DemoOptions, run_demo

    baseline = current_memory_bytes()
    stages: dict[str, float] = {}
    prepare_run = loop.prepare_run

    def recorded(*args: Any, **kwargs: Any) -> Any:
        run = prepare_run(*args, **kwargs)
        stages["peak_after_load_mib"] = (peak_memory_bytes() - baseline) / MIB
        stages["base_model_tensors_mib"] = _tensor_bytes(run.delta_model.base_model) / MIB
        if load_only:
            raise _Loaded
        return run

    loop.prepare_run = recorded  # run_demo looks it up at call time
    start = time.perf_counter()
    try:
        report = run_demo(DemoOptions(out=str(out), steps=steps, examples=examples, overrides=VARIANTS[variant]))
    except _Loaded:
        seconds = time.perf_counter() - start
        return {
            "variant": variant,
            "load_only": True,
            "seconds": seconds,
            "rss_after_imports_mib": baseline / MIB,
            **stages,
        }
    return {
        "variant": variant,
        "steps": steps or 40,
        "eval_examples": examples or 64,
        "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "rss_after_imports_mib": baseline / MIB,
        "peak_hwm_mib": peak_memory_bytes() / MIB,
        "peak_above_imports_mib": (peak_memory_bytes() - baseline) / MIB,
        **stages,
        "exact_match_before": report["before"],
        "exact_match_after": report["after"],
        "record_match_after": report["after_all"].get("record_match"),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import deltatune

    return {**{name: version(name) for name in ("torch", "transformers", "gguf")}, "deltatune": deltatune.__version__}


def _machine() -> dict[str, Any]:
    memory = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "0")
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(memory) / (1 << 20), 1),
        "python": platform.python_version(),
    }


def summarise(results: dict[str, dict[str, Any]], out: Path) -> None:
    """Write the two runs, their ratio and gap against the targets, the machine and versions to `out`."""
    fp32, gguf = results["fp32"], results["gguf"]
    ratio = gguf["peak_above_imports_mib"] / fp32["peak_above_imports_mib"]
    gap = abs(gguf["exact_match_after"] - fp32["exact_match_after"])
    summary = {
        "peak_ratio": ratio,
        "peak_ratio_target": TARGET_RATIO,
        "peak_ratio_met": ratio <= TARGET_RATIO,
        "exact_match_gap": gap,
        "exact_match_gap_target": TARGET_GAP,
        "exact_match_gap_met": gap <= TARGET_GAP,
    }
    document = {"summary": summary, "runs": results, "machine": _machine(), "versions": _versions()}
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here, print its JSON line and keep it")
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltatune-gguf-bench"), help="demo output folders")
    parser.add_argument("--out", type=Path, default=HERE / "results-gguf-base.json")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo's 40); for a quick check")
    parser.add_argument("--examples", type=int, help="held-out examples (default: the demo's 64); for a quick check")
    parser.add_argument("--summarise", action="store_true", help="only summarise the runs kept in --work")
    parser.add_argument("--load-only", action="store_true", help="with --variant: stop once the model is loaded")
    arguments = parser.parse_args()
    if arguments.variant:
        work = arguments.work / arguments.variant
        result = run_variant(arguments.variant, work, arguments.steps, arguments.examples, arguments.load_only)
        if not arguments.load_only:  # --summarise reads whole runs only
            (arguments.work / f"{arguments.variant}.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
        print("RESULT " + json.dumps(result), flush=True)
        return
    if arguments.summarise:
        results = {variant: json.loads((arguments.work / f"{variant}.json").read_text()) for variant in VARIANTS}
        return summarise(results, arguments.out)
    results = {}
    for variant in VARIANTS:  # one process each, one after the other: their peaks never overlap
        command = [sys.executable, __file__, "--variant", variant, "--work", str(arguments.work)]
        command += [f"--{name}={value}" for name in ("steps", "examples") if (value := getattr(arguments, name))]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode or not lines:
            sys.exit(f"the {variant} run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
        print(json.dumps(results[variant]), flush=True)
    summarise(results, arguments.out)


if __name__ == "__main__":
    main()
