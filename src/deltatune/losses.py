"""Task losses, each `loss(model, batch) -> scalar`, and the pieces they share (DESIGN.md §2);
`causal_lm_loss` is the causal one on explicit tensors, for users' own loops.

| loss                   | task                   | what it computes                                        |
|------------------------|------------------------|---------------------------------------------------------|
| `causal_lm_batch_loss` | causal-lm              | next-token cross-entropy at the labelled positions only |
| `seq2seq_lm_loss`      | seq2seq-lm             | decoder cross-entropy at the labelled positions only    |
| `model_loss`           | seq-cls, token-cls, qa | the model's own loss from the batch's label fields      |
| `contrastive_loss`     | feature-extraction     | in-batch contrastive loss of mean-pooled embeddings     |

This module is part of the core library (`deltatune.causal_lm_loss` is public); the task table that
pairs each loss with its model class, encoder and metrics is the trainer's, `deltatune.train.tasks`.

Language-model losses compute the output head only where labels are set. With N labelled positions
out of B·T, the head costs N·d·V instead of B·T·d·V (on SmolLM2 the head is a fifth of the FLOPs, and
prompts are usually longer than completions):

    h = backbone(x)                         B × T × d
    causal:   H = h[:, :-1][labels[:, 1:] ≠ -100]      (position t predicts token t+1)
    seq2seq:  H = h[labels ≠ -100]                     (decoder position t predicts label t)
    loss = mean over the N rows of  −log softmax(head(H))[target]

The gather is a forward pre-hook on the model's output embedding (`get_output_embeddings()`), so the
model's own forward runs unchanged: any scaling before the head (T5) or soft-capping after it (Gemma)
is kept, adapters on the head or a trained copy of it work, and no model code is copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeltaTuneError

IGNORE_INDEX = -100
CONTRASTIVE_SCALE = 20.0
"""Inverse temperature of the in-batch contrastive loss (cosine similarities × 20, as in
sentence-transformers' multiple-negatives ranking loss)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside wrappers: `DistributedDataParallel.module`, `DeltaModel.base_model`."""
    from torch.nn.parallel import DistributedDataParallel

    from .model import DeltaModel

    inner = {DistributedDataParallel: lambda m: m.module, DeltaModel: lambda m: m.base_model}
    while type(model) in inner:
        model = inner[type(model)](model)
    return model


@contextlib.contextmanager
def head_on_rows(model: nn.Module, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[bool]:
    """While inside, the output head sees `select(hidden)` (1 × N × d) instead of B × T × d.
    Yields False (and changes nothing) when the model has no output embedding to hook."""
    get_head = getattr(unwrap(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        yield False
        return

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (select(args[0]).unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield True
    finally:
        handle.remove()


def _labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    **model_inputs: torch.Tensor,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100, with the LM head
    applied at those positions only. Equals `model(input_ids, attention_mask, labels=labels).loss` of
    a transformers causal LM; `model` may be wrapped in a `DeltaModel` (and in DDP). `model_inputs`
    (the `position_ids` of packed rows) go to the model as they are."""
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    if not bool(targets_mask.any()):
        raise DeltaTuneError("this batch has no labelled position (every label is -100): nothing to learn from")

    def select(hidden: torch.Tensor) -> torch.Tensor:
        _check_length(hidden, labels)
        return hidden[:, :-1][targets_mask]

    with head_on_rows(model, select) as hooked:
        if not hooked:
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_inputs).loss
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs).logits
    return _labelled_cross_entropy(logits, labels[:, 1:][targets_mask])


def causal_lm_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`causal_lm_loss` on a collated batch (`input_ids`, `labels`, optional `attention_mask`, and the
    `position_ids` of a packed batch, `deltatune.train.packing`)."""
    positions = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    return causal_lm_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], **positions)


def seq2seq_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of an encoder-decoder over the labelled decoder positions (head applied
    there only). The decoder inputs are the labels shifted right, as the model builds them itself."""
    labels = batch["labels"]
    targets_mask = labels != IGNORE_INDEX
    decoder_input_ids = unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)

    def select(hidden: torch.Tensor) -> torch.Tensor:
        _check_length(hidden, labels)
        return hidden[targets_mask]

    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with head_on_rows(model, select) as hooked:
        if not hooked:
            return model(**batch).loss
        logits = model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits
    return _labelled_cross_entropy(logits, labels[targets_mask])


def _check_length(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.shape[:2] != labels.shape:
        raise DeltaTuneError(
            f"the model's last hidden states have shape {tuple(hidden.shape[:2])} but the labels "
            f"{tuple(labels.shape)}: a method that adds positions must trim them from its outputs"
        )


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model computes itself from the label fields of the batch (classification, QA)."""
    return model(**batch).loss


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states over the real (unmasked) tokens: B × T × d → B × d."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-length sentence embeddings: mean-pooled last hidden states."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask).float(), dim=-1)


def contrastive_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """In-batch contrastive loss for embeddings: text i should be closer to its positive i than to
    the other positives, `CE(scale · cos(a_i, p_j), i)`. Texts and positives share one forward."""
    texts, positives = batch["input_ids"], batch["positive_input_ids"]
    length = max(texts.shape[1], positives.shape[1])
    ids = torch.cat([F.pad(texts, (0, length - texts.shape[1])), F.pad(positives, (0, length - positives.shape[1]))])
    mask = torch.cat(
        [
            F.pad(batch["attention_mask"], (0, length - texts.shape[1])),
            F.pad(batch["positive_attention_mask"], (0, length - positives.shape[1])),
        ]
    )
    embeddings = embed(model, ids, mask)
    anchors, targets = embeddings[: len(texts)], embeddings[len(texts) :]
    scores = CONTRASTIVE_SCALE * anchors @ targets.t()
    return F.cross_entropy(scores, torch.arange(len(texts), device=scores.device))
