"""The merge table: how much of an adapter trained on an nf4 base each way of merging it keeps.

    python bench/merge_quantized.py [--quick] [--match-records N] [--out results.json] [--work DIR]

1. Train LoRA on SmolLM2-135M-Instruct with an nf4 base (`quantize: nf4`) on the demo task, with the
   demo's own settings (`deltatune.train.demo.demo_config`: r=8, α=16, all linear layers of the upper
   half of the blocks, 40 steps of 8, learning rate 2e-3, the chat template), through
   `deltatune.train.train`. The one change: no evaluation during or after training (it does not touch
   the training; every row is evaluated below instead).
2. Measure on the demo's 64 held-out records, the same batches of 32 for every row, each model in eval
   mode: the eval loss (the causal-LM loss on the completion tokens, `deltatune.train.evaluate`), and
   the greedy exact match and record match on the first `--match-records` (16) of them: bitsandbytes'
   4-bit CPU path makes each generated token of an nf4 row slow. Rows: the nf4 base alone; the
   adapter unmerged on a freshly loaded nf4 base (the reference); (a) `deltatune merge --quantize nf4
   --dequantize` (a float32 checkpoint); (b) the same with `--requantize nf4` (an nf4 checkpoint);
   (c) peft's `merge_and_unload()` into a freshly loaded nf4 base, from the adapter saved in peft's
   format; (b') (a) with `--requantize int8` (bitsandbytes 8-bit: how much a finer grid keeps). Every
   merged model is loaded from what was written (a, b, b') or merged in memory (c), as a user gets it.
3. Share of the gain kept = (loss_base − loss_merged) / (loss_base − loss_adapter). Target: (a) ≥ 99 %.

`--quick`: 4 steps, 8 eval records, matches on 4 (a smoke run of the script, not a measurement). Runs on
CPU with 2 threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "src"))

import deltatune  # noqa: E402
from deltatune.train.cli import main as cli  # noqa: E402
from deltatune.train.demo import DemoOptions, demo_config, record_match, write_data  # noqa: E402
from deltatune.train.evaluate import eval_loss, evaluate  # noqa: E402
from deltatune.train.loop import Run, prepare_run, train  # noqa: E402
from deltatune.train.models import load_model, load_tokenizer, model_folder  # noqa: E402

MODEL, QUANTIZE, TARGET = "smollm2", "nf4", 0.99


def trained(work: Path, quick: bool) -> tuple[Run, Path, Path]:
    """Train the demo's LoRA on the nf4 base; the run of the saved adapter on a fresh nf4 base (its
    task, eval features and context: the reference row) and the adapter in deltatune's and in peft's
    format."""
    folder = model_folder(MODEL)
    tokenizer = load_tokenizer(str(folder))
    options = DemoOptions(
        out=str(work / "run"),
        steps=4 if quick else None,
        examples=8 if quick else None,
        overrides=[f"quantize={QUANTIZE}", "eval_every=null", "device=cpu"],
    )
    train_file, eval_file = write_data(options, work / "data")
    layers = json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    config = demo_config(options, train_file, eval_file, layers, bool(tokenizer.chat_template))
    started = time.perf_counter()
    result = train(dataclasses.replace(config, eval_file=None), progress=False)  # evaluated below, per row
    print(f"trained {config.max_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    adapter, peft_folder = result.output_dir / "adapter", work / "adapter-peft"
    result.run.delta_model.save(str(peft_folder), format="peft")
    del result
    gc.collect()
    return prepare_run(config, adapter=str(adapter)), adapter, peft_folder


@torch.no_grad()
def measured(run: Run, model: torch.nn.Module, match_records: int) -> dict[str, float]:
    """The eval loss on every eval record (in eval mode); greedy exact and record match on the first
    `match_records` (generation on the nf4 rows is slow on CPU)."""
    model.eval()
    started = time.perf_counter()
    loss = eval_loss(model, run.task, run.eval_features, run.eval_context)
    loss_seconds = time.perf_counter() - started
    matched = evaluate(model, run.task, run.eval_features[:match_records], run.eval_context, with_loss=False)
    scores = {
        "loss": loss,
        "exact_match": matched.metrics["exact_match"],
        "record_match": record_match(matched.predictions, matched.references),
        "loss_seconds": round(loss_seconds, 1),
        "match_seconds": round(time.perf_counter() - started - loss_seconds, 1),
    }
    print(f"  {scores}", flush=True)
    return scores


@torch.no_grad()
def float32_compute_loss(run: Run) -> float:
    """The reference's eval loss in training mode (no dropout in this model and adapter), where
    bitsandbytes dequantizes each 4-bit weight with its float32 block scales and computes in float32,
    as the merge does; run before any eval-mode call, after which the layers keep the CPU kernel's
    layout with bfloat16 scales."""
    run.delta_model.train()
    return eval_loss(run.delta_model, run.task, run.eval_features, run.eval_context)


def nf4_base() -> torch.nn.Module:
    return load_model(MODEL, quantize=QUANTIZE)


def merged_folder(work: Path, adapter: Path, name: str, *options: str) -> Path:
    out = work / name
    if cli(["merge", MODEL, str(adapter), str(out), "--quantize", QUANTIZE, *options]) != 0:
        raise SystemExit(f"deltatune merge {' '.join(options)} failed")
    return out


def peft_merged(peft_folder: Path) -> torch.nn.Module:
    import peft

    return peft.PeftModel.from_pretrained(nf4_base(), str(peft_folder)).merge_and_unload()


def rows(run: Run, work: Path, adapter: Path, peft_folder: Path, match_records: int) -> dict[str, dict[str, float]]:
    """Each row's model, built when its turn comes and freed after (the reference is the run's own)."""
    from transformers import AutoModelForCausalLM

    builders = {
        "nf4 base": nf4_base,
        "adapter unmerged on the nf4 base": lambda: run.delta_model,
        "(a) deltatune merge --dequantize (float32)": lambda: AutoModelForCausalLM.from_pretrained(
            merged_folder(work, adapter, "merged-float32", "--dequantize")
        ),
        "(b) deltatune merge --requantize nf4": lambda: AutoModelForCausalLM.from_pretrained(
            merged_folder(work, adapter, "merged-nf4", "--requantize", QUANTIZE)
        ),
        "(c) peft merge_and_unload into nf4": lambda: peft_merged(peft_folder),
        "(b') deltatune merge --requantize int8": lambda: AutoModelForCausalLM.from_pretrained(
            merged_folder(work, adapter, "merged-int8", "--requantize", "int8")
        ),
    }
    results = {}
    for name, build in builders.items():
        print(name, flush=True)
        model = build()
        results[name] = measured(run, model, match_records)
        del model
        gc.collect()
    return results


def kept(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per merged row, the share of the adapter's eval-loss gain it keeps."""
    base = results["nf4 base"]["loss"]
    gain = base - results["adapter unmerged on the nf4 base"]["loss"]
    return {name: (base - row["loss"]) / gain for name, row in results.items() if name.startswith("(")}


def environment() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "deltatune": deltatune.__version__,
    }


def table(results: dict[str, dict[str, float]], shares: dict[str, float]) -> str:
    lines = [
        "| model | eval loss | gain kept | exact match | record match |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        share = (
            f"{100 * shares[name]:.1f} %" if name in shares else ("100 % (reference)" if "unmerged" in name else "0")
        )
        lines.append(f"| {name} | {row['loss']:.4f} | {share} | {row['exact_match']:.3f} | {row['record_match']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, 8 eval records: a smoke run")
    parser.add_argument(
        "--match-records", type=int, default=16, help="eval records the greedy matches run on (default 16)"
    )
    parser.add_argument("--out", help="results file (default bench/results-merge-quantized.json; quick: none)")
    parser.add_argument("--work", help="folder for the run and merged models (default: a temporary one, removed)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(arguments.work or tempfile.mkdtemp(prefix="merge-quantized-"))
    try:
        run, adapter, peft_folder = trained(work, arguments.quick)
        reference_float32 = float32_compute_loss(run)
        print(f"adapter unmerged, float32 compute: loss {reference_float32}", flush=True)
        results = rows(run, work, adapter, peft_folder, 4 if arguments.quick else arguments.match_records)
    finally:
        if not arguments.work:
            shutil.rmtree(work, ignore_errors=True)
    shares = kept(results)
    report: dict[str, Any] = {
        "mode": "quick" if arguments.quick else "full",
        "model": "SmolLM2-135M-Instruct",
        "base": QUANTIZE,
        "eval_records": len(run.eval_features),
        "match_records": min(len(run.eval_features), 4 if arguments.quick else arguments.match_records),
        "steps": run.config.max_steps,
        "rows": results,
        "gain_kept": shares,
        "reference_loss_float32_compute": reference_float32,
        "target": {"row": "(a) deltatune merge --dequantize (float32)", "gain_kept_at_least": TARGET},
        "met": shares["(a) deltatune merge --dequantize (float32)"] >= TARGET,
        "environment": environment(),
    }
    out = arguments.out or (None if arguments.quick else str(REPOSITORY / "bench" / "results-merge-quantized.json"))
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(table(results, shares))
    print(f"\n(a) keeps {100 * shares['(a) deltatune merge --dequantize (float32)']:.2f} % (target ≥ {TARGET:.0%})")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
