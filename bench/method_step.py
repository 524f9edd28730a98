"""One training step of each method in `METHODS`, peft's beside deltatune's, on SmolLM2-135M.

    python bench/method_step.py [--quick] [--methods ia3 ...] [--batch 2] [--length 128] [--repeats 5]
                                [--threads 2] [--out results.json]

A step is forward + backward of the causal-LM loss on a random batch (the adapter's gradients, no
optimizer). Per method both libraries build the adapter from their own config in `METHODS`; deltatune's
weights are drawn (ones or zeros moved by 0.01 · noise: a trained adapter's size) and written into peft's
model through deltatune's peft-format file, and the logits are compared before any timing, so both run
the same adapter with the same weights (a pair of configs that describe different adapters stops the run).
Beside them runs the floor (`workloads.floor`): the frozen model with one trained scalar on block 0's
attention output, the least any adapter's step can cost, since the backward still runs through every
block; floor / peft is the best ratio a method can reach without doing less than the model's own work.
The calls alternate (`measure.time_interleaved`); each figure is the median of `--repeats`. CPU, 2 threads
unless `--threads`. `--quick`: a tiny Llama, one repeat (a smoke run of the script, not a measurement).

A method is one entry of `METHODS`: {name: (peft config factory, deltatune config factory)}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "src"))

import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import deltatune  # noqa: E402
from measure import time_interleaved  # noqa: E402
from models import causal_lm, labels_for, token_batch, training_step  # noqa: E402
from side_by_side import logits_difference, step_parser  # noqa: E402
from workloads import floor  # noqa: E402

IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
"""peft's default (IA)³ targets for Llama, `down_proj` its feed-forward layer."""

METHODS: dict[str, tuple[Callable[[], peft.PeftConfig], Callable[[], deltatune.DeltaConfig]]] = {
    "ia3": (
        lambda: peft.IA3Config(target_modules=list(IA3_TARGETS), feedforward_modules=["down_proj"]),
        lambda: deltatune.IA3Config(target_modules=list(IA3_TARGETS), feedforward_modules=["down_proj"]),
    ),
    "loha": (
        lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
        lambda: deltatune.LoHaConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
    ),
    "loha-all-linear": (
        lambda: peft.LoHaConfig(r=8, alpha=8, target_modules="all-linear"),
        lambda: deltatune.LoHaConfig(r=8, alpha=8, target_modules="all-linear"),
    ),
    "lokr-all-linear": (
        lambda: peft.LoKrConfig(r=8, alpha=8, target_modules="all-linear"),
        lambda: deltatune.LoKrConfig(r=8, alpha=8, target_modules="all-linear"),
    ),
}


def models(name: str, quick: bool, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft's model, deltatune's) for method `name`, with the same adapter weights."""
    peft_config, our_config = METHODS[name]
    base = causal_lm(quick)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    ours = deltatune.attach(base, our_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ours.adapter_parameters("default"):
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    ours.save(str(folder), format="peft")
    result = peft.set_peft_model_state_dict(theirs, load_file(folder / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise SystemExit(f"{name}: peft's model has no place for {result.unexpected_keys[:3]}: the configs differ")
    return theirs, ours


def measure(name: str, options: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours = models(name, options.quick, Path(folder))
    least = floor(causal_lm(options.quick))
    input_ids = token_batch(ours, options.batch, options.length)
    labels = labels_for(input_ids, None)
    difference = logits_difference(theirs, ours, input_ids, name)
    steps = time_interleaved(
        {
            "peft": lambda: training_step(theirs, input_ids, labels),
            "deltatune": lambda: training_step(ours, input_ids, labels),
            "floor": lambda: training_step(least, input_ids, labels),
        },
        warmup=1,
        repeats=1 if options.quick else options.repeats,
    )
    return {
        "logits_max_difference": difference,
        "training_step": steps,
        "ratio": steps["deltatune"]["seconds"] / steps["peft"]["seconds"],
        "floor_ratio": steps["floor"]["seconds"] / steps["peft"]["seconds"],
    }


def main(arguments: list[str] | None = None) -> dict:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    options = parser.parse_args(arguments)
    torch.set_num_threads(options.threads)
    results = {name: measure(name, options) for name in options.methods}
    print(f"{'method':<10} {'peft s':>10} {'deltatune s':>12} {'ratio':>7} {'floor s':>10} {'floor ratio':>12}")
    for name, row in results.items():
        seconds = {library: timing["seconds"] for library, timing in row["training_step"].items()}
        print(
            f"{name:<10} {seconds['peft']:>10.4f} {seconds['deltatune']:>12.4f} {row['ratio']:>7.3f} "
            f"{seconds['floor']:>10.4f} {row['floor_ratio']:>12.3f}"
        )
    report = {"settings": {**vars(options), "out": str(options.out)}, "methods": results}
    if options.out is not None:
        options.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
