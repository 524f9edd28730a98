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

import deltatune  # noqa: E402
from deltatune.methods.oft_rotation import block_diagonal, rotate_features  # noqa: E402
from measure import time_interleaved  # noqa: E402
from models import causal_lm, eval_forward, labels_for, token_batch, training_step  # noqa: E402


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
    base = causal_lm(quick)
    block_size = 8 if quick else 32
    config = peft.OFTConfig(target_modules="all-linear", oft_block_size=block_size, init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "oft_R" in name:
                parameter.mul_(0.1)
    theirs.save_pretrained(folder)
    ours = deltatune.load(base, str(folder), trainable=True)
    return theirs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rotation-only", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    repeats = 1 if options.quick else options.repeats
    widths = (64, 128) if options.quick else (576, 1536)
    rotations = {str(width): rotation_times(options.batch * options.length, width, repeats * 3) for width in widths}
    if options.rotation_only:
        report(
            {"settings": {**vars(options), "out": str(options.out)}, "rotation_forward_backward": rotations}, options
        )
        return
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours = models(options.quick, Path(folder))
    input_ids = token_batch(ours, options.batch, options.length)
    labels = labels_for(input_ids, None)
    with torch.no_grad():
        difference = (theirs.eval()(input_ids=input_ids).logits - ours.eval()(input_ids=input_ids).logits).abs().max()
    if difference > 1e-3:
        raise SystemExit(f"the two models disagree by {difference:.3g} in their logits: nothing to compare")
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
    one_token = input_ids[:1, :1]

    def decode(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: [eval_forward(model, one_token) for _ in range(10)]

    decoding = time_interleaved({"peft": decode(theirs), "deltatune": decode(ours)}, warmup=1, repeats=repeats)
    results = {
        "settings": {**vars(options), "out": str(options.out)},
        "rotation_forward_backward": rotations,
        "logits_max_difference": difference.item(),
        "training_step": steps,
        "unmerged_forward": forwards,
        "one_token_forward_x10": decoding,
        "ratios": {
            "training_step": steps["deltatune"]["seconds"] / steps["peft"]["seconds"],
            "unmerged_forward": forwards["deltatune"]["seconds"] / forwards["peft"]["seconds"],
            "one_token_forward": decoding["deltatune"]["seconds"] / decoding["peft"]["seconds"],
        },
    }
    report(results, options)


def report(results: dict, options: argparse.Namespace) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
