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
model's own forward runs unchanged: any scaling before the head (T5) is kept, adapters on the head or a
trained copy of it work, and no model code is copied. With `chunk_rows` (the default) the model's head
path gets one real row only, and `chunked_loss` computes the head and cross-entropy over all N rows a
chunk at a time, never the N × V logits at once; what the model does after its head (Gemma's
soft-capping, Cohere's and Granite's scales) is taken from its config and checked on that row against
the logits the model returned, with the plain computation where it does not match.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .chunked_loss import DEFAULT_CHUNK_ROWS, chunked_cross_entropy, logit_transform, reproduces_the_model
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


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (`get_output_embeddings()`), or None where it has none."""
    get_head = getattr(unwrap(model), "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


@contextlib.contextmanager
def head_on_rows(model: nn.Module, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[bool]:
    """While inside, the output head sees `select(hidden)` (1 × N × d) instead of B × T × d.
    Yields False (and changes nothing) when the model has no output embedding to hook."""
    head = output_head(model)
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


@contextlib.contextmanager
def loss_chunk_rows(rows: int | None) -> Iterator[None]:
    """While inside, the task losses (`causal_lm_batch_loss`, `seq2seq_lm_loss`) compute the head and
    cross-entropy `rows` labelled rows at a time (None: all at once); the trainer's `loss_chunk_rows`."""
    token = _CHUNK_ROWS.set(rows)
    try:
        yield
    finally:
        _CHUNK_ROWS.reset(token)


_CHUNK_ROWS: ContextVar[int | None] = ContextVar("loss_chunk_rows", default=DEFAULT_CHUNK_ROWS)
_NOT_CHUNKABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Models whose logits the chunked loss could not reproduce: they take the plain path (warned once)."""


def labelled_rows_loss(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    select: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_rows: int | None,
) -> torch.Tensor | None:
    """Mean cross-entropy of the logits at the rows `select` takes from the head's input, against
    `targets`, where `forward()` runs the model and returns its logits; None where the model has no
    output head. With `chunk_rows`, the model's own forward sends one real row through its head path,
    and the loss is `chunked_loss.chunked_cross_entropy` over all rows, once the model's logits for that
    row are reproduced (else, warned once per model, the plain loss: every row through the model's head)."""
    head = output_head(model)
    if head is None:
        return None
    inner = unwrap(model)
    if chunk_rows is None or inner in _NOT_CHUNKABLE:
        with head_on_rows(model, select):
            return _labelled_cross_entropy(forward(), targets)
    rows: list[torch.Tensor] = []
    head_outputs: list[torch.Tensor] = []

    def first_row(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(select(hidden))
        return rows[-1][:1]

    handle = head.register_forward_hook(lambda module, args, output: head_outputs.append(output))
    try:
        with head_on_rows(model, first_row):
            model_logits = forward()
    finally:
        handle.remove()
    transform = logit_transform(inner.config)
    if len(rows) == len(head_outputs) == 1 and reproduces_the_model(transform, head_outputs[0], model_logits):
        return chunked_cross_entropy(head, rows[0], targets, chunk_rows, transform)
    _NOT_CHUNKABLE.add(inner)
    warnings.warn(
        f"{type(inner).__name__} changes its logits after the output head in a way the chunked loss does not "
        "reproduce; it computes the loss over all labelled rows at once instead (loss_chunk_rows: null)",
        stacklevel=3,
    )
    with head_on_rows(model, select):
        return _labelled_cross_entropy(forward(), targets)


def _labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
    **model_inputs: torch.Tensor,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100, with the LM head
    applied at those positions only, `chunk_rows` of them at a time (None: all at once; see
    `deltatune.chunked_loss`). Equals `model(input_ids, attention_mask, labels=labels).loss` of a
    transformers causal LM; `model` may be wrapped in a `DeltaModel` (and in DDP). `model_inputs`
    (the `position_ids` of packed rows) go to the model as they are."""
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    if not bool(targets_mask.any()):
        raise DeltaTuneError("this batch has no labelled position (every label is -100): nothing to learn from")

    def select(hidden: torch.Tensor) -> torch.Tensor:
        _check_length(hidden, labels)
        return hidden[:, :-1][targets_mask]

    def forward() -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs).logits

    loss = labelled_rows_loss(model, forward, select, labels[:, 1:][targets_mask], chunk_rows)
    if loss is None:
        return model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **model_inputs
        ).loss  # no cache: transformers reads packed rows from position_ids only without one
    return loss


def causal_lm_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`causal_lm_loss` on a collated batch (`input_ids`, `labels`, optional `attention_mask`, and the
    `position_ids` of a packed batch, `deltatune.train.packing`), in chunks of the rows
    `loss_chunk_rows` sets."""
    positions = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    return causal_lm_loss(
        model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], _CHUNK_ROWS.get(), **positions
    )


def seq2seq_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of an encoder-decoder over the labelled decoder positions (head applied
    there only, in chunks of the rows `loss_chunk_rows` sets). The decoder inputs are the labels
    shifted right, as the model builds them itself."""
    labels = batch["labels"]
    targets_mask = labels != IGNORE_INDEX
    decoder_input_ids = unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)

    def select(hidden: torch.Tensor) -> torch.Tensor:
        _check_length(hidden, labels)
        return hidden[targets_mask]

    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def forward() -> torch.Tensor:
        return model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits

    loss = labelled_rows_loss(model, forward, select, labels[targets_mask], _CHUNK_ROWS.get())
    return model(**batch).loss if loss is None else loss


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
