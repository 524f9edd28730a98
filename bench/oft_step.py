"""OFT side by side with peft's: how the rotation is applied, then a training step and a forward on SmolLM2.

    python bench/oft_step.py [--quick] [--rotation-only] [--batch 2] [--length 128] [--repeats 5] [--out results.json]

1. Rotation: x R for x of (batch · length) tokens × n features and R block-diagonal (n / 32 blocks of
   32), forward + backward (gradients of x and of the blocks), three ways: deltatune's batched matmul
   over the blocks, peft 0.21's einsum over the same blocks, and the dense n × n block-diagonal matrix.
   n = 576 and 1536 are SmolLM2's hidden and FFN widths.
2. Model: OFT on every linear layer of SmolLM2-135M (peft's defaults: blocks of 32, Cayley-Neumann with
   5 terms; random parameters of a trained adapter's size), the same weights in both libraries (peft's
   adapter is saved and loaded into deltatune); a training step (forward + backward of the causal-LM
   loss, no optimizer), an unmerged forward without autograd, and a one-token forward (the shape of a
   decoding step: there the rotation's own cost shows, which deltatune keeps in eval mode and peft
   recomputes per call; 10 calls per timing).
Calls alternate (`measure.time_interleaved`); each figure is the median of `--repeats`. CPU, 2 threads
unless `--threads`. `--quick`: a tiny model (a smoke run of the script, not a measurement);
`--rotation-only`: part 1 alone.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "src"))

import peft  # noqa: E402

from deltatune.methods.oft_rotation import block_diagonal, rotate_features  # noqa: E402
from measure import time_interleaved  # noqa: E402
from models import causal_lm, eval_forward, labels_for, token_batch  # noqa: E402
from side_by_side import logits_difference, peft_adapter_in_both, step_parser, steps_and_forwards, write_report  # noqa: E402


def einsum_rotation(x: torch.Tensor, blocks: torch.Tensor, features: int) -> torch.Tensor:
    """peft 0.21's form of the same product."""
    count, size, _ = blocks.shape
    split = x.reshape(*x.shape[:-1], count, size)
    return torch.einsum("...rk,rkc->...rc", split, blocks).reshape(x.shape)


def dense_rotation(x: torch.Tensor, blocks: torch.Tensor, features: int) -> torch.Tensor:
    return x @ block_diagonal(blocks, features)


ROTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "batched (deltatune)": rotate_features,
    "einsum (peft)": einsum_rotation,
    "dense n x n": dense_rotation,
}


def rotation_times(tokens: int, features: int, repeats: int) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, features, generator=generator, requires_grad=True)
    blocks = torch.randn(features // 32, 32, 32, generator=generator, requires_grad=True)

    def call(rotation: Callable) -> Callable[[], None]:
        def run() -> None:
            rotation(x, blocks, features).sum().backward()
            x.grad = blocks.grad = None

        return run

    return time_interleaved({name: call(rotation) for name, rotation in ROTATIONS.items()}, 1, repeats)


def models(quick: bool, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft's OFT model, deltatune's) with the same weights."""
    config = peft.OFTConfig(target_modules="all-linear", oft_block_size=8 if quick else 32, init_weights=False)
    return peft_adapter_in_both(causal_lm(quick), config, "oft_R", 0.1, folder)


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--rotation-only", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    repeats = 1 if options.quick else options.repeats
    widths = (64, 128) if options.quick else (576, 1536)
    rotations = {str(width): rotation_times(options.batch * options.length, width, repeats * 3) for width in widths}
    if options.rotation_only:
        write_report(
            {"settings": {**vars(options), "out": str(options.out)}, "rotation_forward_backward": rotations},
            options.out,
        )
        return
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours = models(options.quick, Path(folder))
    input_ids = token_batch(ours, options.batch, options.length)
    labels = labels_for(input_ids, None)
    difference = logits_difference(theirs, ours, input_ids, "OFT")
    steps, forwards = steps_and_forwards({"peft": theirs, "deltatune": ours}, input_ids, labels, repeats)
    one_token = input_ids[:1, :1]

    def decode(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: [eval_forward(model, one_token) for _ in range(10)]

    decoding = time_interleaved({"peft": decode(theirs), "deltatune": decode(ours)}, warmup=1, repeats=repeats)
    results = {
        "settings": {**vars(options), "out": str(options.out)},
        "rotation_forward_backward": rotations,
        "logits_max_difference": difference,
        "training_step": steps,
        "unmerged_forward": forwards,
        "one_token_forward_x10": decoding,
        "ratios": {
            "training_step": steps["deltatune"]["seconds"] / steps["peft"]["seconds"],
            "unmerged_forward": forwards["deltatune"]["seconds"] / forwards["peft"]["seconds"],
            "one_token_forward": decoding["deltatune"]["seconds"] / decoding["peft"]["seconds"],
        },
    }
    write_report(results, options.out)


if __name__ == "__main__":
    main()
