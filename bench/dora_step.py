"""DoRA side by side with peft's: one training step and one unmerged forward on SmolLM2-135M.

    python bench/dora_step.py [--quick] [--batch 2] [--length 128] [--repeats 5] [--out results.json]

Both libraries adapt every linear layer of the same model (r=16, α=32, `use_dora`, B random so that the
DoRA rescaling is not the identity), with the same weights: peft's adapter is saved and loaded into
deltatune. A training step is forward + backward of the causal-LM loss on a random batch (gradients of A,
B and the magnitude, no optimizer); the forward is in eval mode without autograd, where deltatune keeps
the weight norm between calls and peft (its default, `ENABLE_DORA_CACHING = False`) recomputes it.
The calls alternate (`measure.time_interleaved`) and each figure is the median of `--repeats`. CPU,
2 threads unless `--threads`. `--quick`: a tiny model (a smoke run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "src"))

import peft  # noqa: E402

import deltatune  # noqa: E402
from measure import time_interleaved  # noqa: E402
from models import causal_lm, eval_forward, labels_for, token_batch, training_step  # noqa: E402


def models(quick: bool, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft's DoRA model, deltatune's) with the same weights."""
    base = causal_lm(quick)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)  # a trained adapter's size, not Kaiming's
    theirs.save_pretrained(folder)
    ours = deltatune.load(base, str(folder), trainable=True)
    return theirs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours = models(options.quick, Path(folder))
    input_ids = token_batch(ours, options.batch, options.length)
    labels = labels_for(input_ids, None)
    with torch.no_grad():
        difference = (theirs.eval()(input_ids=input_ids).logits - ours.eval()(input_ids=input_ids).logits).abs().max()
    if difference > 1e-3:
        raise SystemExit(f"the two models disagree by {difference:.3g} in their logits: nothing to compare")
    repeats = 1 if options.quick else options.repeats
    steps = time_interleaved(
        {
            "peft": lambda: training_step(theirs, input_ids, labels),
            "deltatune": lambda: training_step(ours, input_ids, labels),
        },
        warmup=1,
        repeats=repeats,
    )
    forwards = time_interleaved(
        {"peft": lambda: eval_forward(theirs, input_ids), "deltatune": lambda: eval_forward(ours, input_ids)},
        warmup=1,
        repeats=repeats,
    )
    results = {
        "settings": {**vars(options), "out": str(options.out)},
        "logits_max_difference": difference.item(),
        "training_step": steps,
        "unmerged_forward": forwards,
        "ratios": {
            "training_step": steps["deltatune"]["seconds"] / steps["peft"]["seconds"],
            "unmerged_forward": forwards["deltatune"]["seconds"] / forwards["peft"]["seconds"],
        },
    }
    text = json.dumps(results, indent=2)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
