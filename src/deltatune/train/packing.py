"""Padding-free packing of causal-LM examples (`packing: true`).

A micro-batch's examples are laid out end to end in rows of at most `max_length` tokens instead of
one padded row each:

    padded:  a a a . .        packed:  a a a b b     position_ids  0 1 2 0 1
             b b . . .                 c c c c .                   0 1 2 3 0
             c c c c .

Each example keeps its own positions (`position_ids` restart at 0) and attends only to itself: given
`position_ids` and no `attention_mask`, transformers (5.x and 4.57 alike, `masking_utils`) finds the
restarts and builds a block-diagonal causal mask for SDPA and eager attention; flash attention reads
the restarts as variable-length sequences, but only from a single row, so for it every example of the
micro-batch goes into one row. A row shorter than the longest is padded at its end, its padding
numbered from 0 again so that it is a block of its own, unlabelled.

Labels are the examples' own, except that the first token of each example is unlabelled: alone, it
is predicted by nothing; packed, the last token of the example before it would learn to predict it.
So the loss (the mean over the labelled tokens) and its gradients are those of the padded batch, up to
float rounding. The rows are balanced (`rows_of`): as few as hold the tokens, of nearly equal length,
so that padding them to the longest wastes little.

Packing changes how a micro-batch is laid out, not which examples it holds: steps, epochs, the
learning-rate schedule and `--resume` count examples exactly as without packing.

A model whose attention does not follow restarted `position_ids` would silently mix examples, so
`packed_collate_for` first runs a probe (`check_model_packs`): a short sequence packed behind two
different ones must give the same logits both times, and those it gives alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import DeltaTuneError
from ..losses import IGNORE_INDEX, unwrap

ONE_ROW_ATTENTION_PREFIX = "flash_attention"
"""Attention implementations (`flash_attention_2`, `flash_attention_3`) that find packed examples in
`position_ids` only in a batch of one row: for them a micro-batch is packed into a single row."""
SEPARATION_TOLERANCE = 1e-4
"""Probe: how much (relative to the largest logit) a packed example's logits may move when the
example before it changes. Attention confined to the example moves them by rounding only."""
POSITION_TOLERANCE = 5e-2
"""Probe: how far (relative) a packed example's logits may be from its logits alone: rounding of other
shapes, in bfloat16 too, but not positions counted on from the example before."""
PROBE_BEFORE = ((3, 4, 5), (6, 7, 8))
PROBE_SEQUENCE = (9, 10, 11, 12)
"""Probe: token ids (modulo the vocabulary size) of the two sequences packed before the probed one, and
of the probed one."""


class PackingError(DeltaTuneError):
    """A model that cannot train on packed rows."""


def rows_of(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Indices of the examples in each row: the fewest rows of `capacity` tokens that hold them
    (⌈tokens / capacity⌉, one more while that overflows), each example, longest first, into the row
    with the fewest tokens so far; so the rows differ in length by at most one example, and little is
    padded. `capacity` None: all in one row."""
    if capacity is None:
        return [list(range(len(lengths)))]
    longest_first = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    count = max(1, math.ceil(sum(lengths) / capacity))
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        filled = [0] * count
        for index in longest_first:
            row = min(range(count), key=filled.__getitem__)
            rows[row].append(index)
            filled[row] += lengths[index]
        if max(filled) <= capacity or count >= len(lengths):
            return rows
        count += 1


def collate_packed(features: list[dict[str, Any]], pad_id: int, capacity: int | None) -> dict[str, torch.Tensor]:
    """`input_ids`, `position_ids` and `labels` of causal-LM examples packed into rows (`rows_of`),
    R × W with W the longest row; no `attention_mask` (the restarts in `position_ids` are the mask)."""
    rows = rows_of([len(feature["input_ids"]) for feature in features], capacity)
    width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    input_ids, position_ids, labels = (torch.full((len(rows), width), value) for value in (pad_id, 0, IGNORE_INDEX))
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            ids, example_labels = features[index]["input_ids"], features[index]["labels"]
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            position_ids[row, start:end] = torch.arange(len(ids))
            labels[row, start + 1 : end] = torch.tensor(example_labels[1:])
            start = end
        position_ids[row, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def packed_collate_for(
    model: nn.Module, max_length: int, pad_id: int, device: torch.device
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """The collate function of packed training for `model` (on `device`), once the probe has passed:
    rows of `max_length`, or one row for attention that reads packing from a single row."""
    check_model_packs(model, device)
    implementation = str(getattr(unwrap(model).config, "_attn_implementation", None) or "")
    capacity = None if implementation.startswith(ONE_ROW_ATTENTION_PREFIX) else max_length
    return functools.partial(collate_packed, pad_id=pad_id, capacity=capacity)


def check_model_packs(model: nn.Module, device: torch.device) -> None:
    """Refuse a model whose packed examples are not computed as alone: a sequence packed behind two
    different ones (in one row, positions restarted) must give the same logits both times, and within
    `POSITION_TOLERANCE` of its logits alone. Runs in eval mode, without gradients or a cache
    (transformers looks for packed examples only when there is no cache)."""
    base = unwrap(model)
    vocabulary = base.config.vocab_size
    before = [torch.tensor(tokens) % vocabulary for tokens in PROBE_BEFORE]
    probe = torch.tensor(PROBE_SEQUENCE) % vocabulary
    positions = torch.cat([torch.arange(len(before[0])), torch.arange(len(probe))]).unsqueeze(0).to(device)
    model_type = base.config.model_type
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            behind = [
                model(
                    input_ids=torch.cat([first, probe]).unsqueeze(0).to(device),
                    position_ids=positions,
                    use_cache=False,
                )
                .logits[0, len(before[0]) :]
                .float()
                for first in before
            ]
            alone = model(input_ids=probe.unsqueeze(0).to(device), use_cache=False).logits[0].float()
    except TypeError as error:
        raise PackingError(
            f"packing: {model_type} models do not take position_ids ({error}); set packing: false"
        ) from None
    finally:
        model.train(training)
    scale = float(alone.abs().max()) or 1.0
    if float((behind[0] - behind[1]).abs().max()) > SEPARATION_TOLERANCE * scale:
        raise PackingError(
            f"packing: {model_type} models let packed examples attend to each other (their attention does not "
            "follow restarted position_ids); set packing: false"
        )
    if float((behind[0] - alone).abs().max()) > POSITION_TOLERANCE * scale:
        raise PackingError(
            f"packing: {model_type} models compute a packed example otherwise than alone (its positions do not "
            "restart with position_ids); set packing: false"
        )


def packing_refusal(task: str, adapter_config: Any) -> str | None:
    """Why a run of `task` with this adapter cannot pack (None: it can), checked with the config."""
    from ..methods.soft_prompt import SoftPromptConfig

    if task == "seq2seq-lm":
        return (
            "packing is not available for seq2seq-lm: under transformers 4.57 T5's encoder builds its attention "
            "mask from a 2-D padding mask only (so packed sources would attend to each other) and no "
            "encoder-decoder takes position_ids; set packing: false"
        )
    if task != "causal-lm":
        return f"packing applies to causal-lm only, not {task}; set packing: false"
    from ..methods.reft import ReftConfig

    if isinstance(adapter_config, ReftConfig):
        return (
            "packing cannot be used with reft: its interventions sit at each row's first and last real tokens, so "
            "a packed row would get them once for all its examples; set packing: false"
        )
    if isinstance(adapter_config, SoftPromptConfig):
        return (
            f"packing cannot be used with {adapter_config.method}: its virtual tokens go in front of every "
            "sequence, so a packed row would get them once for all its examples; set packing: false"
        )
    return None
