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

import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "src"))

import peft  # noqa: E402

from models import causal_lm, labels_for, token_batch  # noqa: E402
from side_by_side import logits_difference, peft_adapter_in_both, step_parser, steps_and_forwards, write_report  # noqa: E402


def models(quick: bool, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft's DoRA model, deltatune's) with the same weights."""
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    return peft_adapter_in_both(causal_lm(quick), config, "lora_B", 0.01, folder)


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0])
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours = models(options.quick, Path(folder))
    input_ids = token_batch(ours, options.batch, options.length)
    labels = labels_for(input_ids, None)
    difference = logits_difference(theirs, ours, input_ids, "DoRA")
    repeats = 1 if options.quick else options.repeats
    steps, forwards = steps_and_forwards({"peft": theirs, "deltatune": ours}, input_ids, labels, repeats)
    results = {
        "settings": {**vars(options), "out": str(options.out)},
        "logits_max_difference": difference,
        "training_step": steps,
        "unmerged_forward": forwards,
        "ratios": {
            "training_step": steps["deltatune"]["seconds"] / steps["peft"]["seconds"],
            "unmerged_forward": forwards["deltatune"]["seconds"] / forwards["peft"]["seconds"],
        },
    }
    write_report(results, options.out)


if __name__ == "__main__":
    main()
