"""What autograd keeps for backward in one LoRA training step's forward, per library:

    python bench/saved_tensors.py [--quick] [--quantize nf4|none] [--dropout 0.05] [--velora-groups 64]
                                  [--monteclora-samples 8]

The forward (and loss) runs under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor
an autograd node saves. Tensors sharing storage are counted once (a layer's input saved by three
projections is one tensor), parameters are left out (they are resident anyway), and the rest is
grouped by shape: the memory a training step holds between forward and backward besides the model.
`--velora-groups G`: the LoRA adapters are VeLoRA's (`velora_config`, G sub-tokens per token).
`--monteclora-samples K`: they are MonteCLoRA's (`monteclora_config`, K noisy copies of A per call).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import checkpoint_causal_lm, labels_for, token_batch  # noqa: E402
from workloads import BATCH, LENGTH, lora_model  # noqa: E402


def storage_pointer(tensor: torch.Tensor) -> int | None:
    """Where a tensor's storage starts; None for a wrapper tensor subclass (a quanto or torchao weight)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def saved_by_shape(
    library: str, quick: bool, quantize: str | None, dropout: float, **options: object
) -> tuple[Counter, Counter]:
    """({(shape, dtype): bytes}, {(shape, dtype): count}) of the distinct non-parameter storages saved
    for backward by one forward."""
    model = checkpoint_causal_lm(quick, quantize).train()
    wrapped = lora_model(library, model, dropout, **options)
    parameters = {storage_pointer(parameter) for parameter in wrapped.parameters()} - {None}
    input_ids = token_batch(model, BATCH, LENGTH)
    labels = labels_for(input_ids, None)
    seen: set[int] = set()
    sizes: Counter = Counter()
    counts: Counter = Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = storage_pointer(tensor)
        if pointer is not None and pointer not in seen | parameters and tensor.untyped_storage().nbytes():
            seen.add(pointer)
            key = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            sizes[key] += tensor.untyped_storage().nbytes()
            counts[key] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if library == "deltatune":
            from deltatune.losses import causal_lm_loss

            loss = causal_lm_loss(wrapped, input_ids, None, labels)
        else:
            loss = wrapped(input_ids=input_ids, labels=labels).loss
    loss.backward()
    return sizes, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quantize", default="nf4", help="a deltatune.train.quantize name, or none")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--velora-groups", type=int, default=0, help="VeLoRA's num_groups (0: plain LoRA)")
    parser.add_argument("--monteclora-samples", type=int, default=0, help="MonteCLoRA's num_samples (0: plain LoRA)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(2)
    quantize = None if arguments.quantize == "none" else arguments.quantize
    for library in ("deltatune", "peft"):
        groups, samples = arguments.velora_groups, arguments.monteclora_samples
        options = {"velora_config": {"num_groups": groups}} if groups else {}
        if samples:
            options["monteclora_config"] = {"num_samples": samples}
        sizes, counts = saved_by_shape(library, arguments.quick, quantize, arguments.dropout, **options)
        print(f"{library}: {sum(sizes.values()) / 2**20:.1f} MiB saved for backward in {sum(counts.values())} tensors")
        for key, size in sizes.most_common(arguments.top):
            print(f"  {size / 2**20:8.1f} MiB  {counts[key]:>4} × {key[1]:<8} {key[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
