"""The pieces every peft-beside-deltatune benchmark shares: the same adapter in both libraries, a check
that they compute the same logits before anything is timed, and the paired timings of a training step
and an unmerged forward."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import torch

import deltatune
from measure import time_interleaved
from models import eval_forward, training_step


def step_parser(description: str) -> argparse.ArgumentParser:
    """The options every side-by-side benchmark takes (a script adds its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat: a smoke run, not a measurement")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    return parser


def peft_adapter_in_both(
    base: torch.nn.Module, config: peft.PeftConfig, scaled: str, factor: float, folder: Path
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft's model, deltatune's) with one adapter: peft builds it from `config`, the parameters whose
    names hold `scaled` are multiplied by `factor` (a trained adapter's size), and deltatune loads the
    folder peft saves."""
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if scaled in name:
                parameter.mul_(factor)
    theirs.save_pretrained(folder)
    return theirs, deltatune.load(base, str(folder), trainable=True)


def logits_difference(theirs: torch.nn.Module, ours: torch.nn.Module, input_ids: torch.Tensor, what: str) -> float:
    """The largest logit difference of the two models in eval mode; the run stops above 1e-3, where the
    two would not be running the same adapter."""
    with torch.no_grad():
        difference = (theirs.eval()(input_ids=input_ids).logits - ours.eval()(input_ids=input_ids).logits).abs().max()
    if difference > 1e-3:
        raise SystemExit(f"{what}: the two models disagree by {difference:.3g} in their logits: nothing to compare")
    return difference.item()


def steps_and_forwards(
    models: dict[str, torch.nn.Module], input_ids: torch.Tensor, labels: torch.Tensor, repeats: int
) -> tuple[dict, dict]:
    """Paired timings of {library: model}: a training step, then an unmerged forward without autograd."""

    def each(call: Callable[[torch.nn.Module], None]) -> dict[str, Callable[[], None]]:
        return {library: (lambda model=model: call(model)) for library, model in models.items()}

    steps = time_interleaved(each(lambda model: training_step(model, input_ids, labels)), warmup=1, repeats=repeats)
    forwards = time_interleaved(each(lambda model: eval_forward(model, input_ids)), warmup=1, repeats=repeats)
    return steps, forwards


def write_report(results: dict, out: Path | None) -> None:
    """Print the results as JSON, and write them to `out` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
