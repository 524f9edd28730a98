"""The output head and cross-entropy over N labelled rows, a chunk of rows at a time, so that the
N × V logits never exist at once, in forward or in backward.

    H: N × d (the head's input at the labelled rows),  y: N targets,  c = chunk_rows
    loss = (1/N) Σ_k  Σ_{i ∈ chunk k}  −log softmax(g(head(H_i)))[y_i]

`g` is what the model does to the head's output before it returns logits (identity for most models;
`LOGIT_TRANSFORMS` lists those known from their config). Each chunk's sum runs under non-reentrant
`torch.utils.checkpoint`: forward keeps only the chunk's input rows and its scalar; backward recomputes
the chunk's logits (c × V), takes their gradient (one more c × V tensor, `SummedCrossEntropy`) and
frees both before the next chunk, since autograd runs the chunks' subgraphs one after the other
(latest first). The cost is one more head forward over
the rows. Any head works: a plain or tied linear, one with adapters (hooks on the module), a trained
copy, a quantized or GGUF layer; gradients reach its trainable parameters and the rows as in the
plain loss.

The model's own forward still decides `g`: the caller lets one real row through the model's head path
and `reproduces_the_model` checks that `g(head(row))` gives the logits the model returned for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_ROWS = 64
"""Rows per chunk by default: 64 × 49,152 float32 logits (SmolLM2's vocabulary) are 12 MiB, of which
backward holds two (the logits and their gradient); still a large matmul."""

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def _soft_cap(cap: float, logits: torch.Tensor) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


def _scale(scale: float, logits: torch.Tensor) -> torch.Tensor:
    return logits * scale


def _divide(divisor: float, logits: torch.Tensor) -> torch.Tensor:
    return logits / divisor


LOGIT_TRANSFORMS: dict[str, Callable[[float, torch.Tensor], torch.Tensor]] = {
    "final_logit_softcapping": _soft_cap,  # Gemma 2 and 3: cap · tanh(logits / cap)
    "logit_scale": _scale,  # Cohere: logits · scale
    "logits_scaling": _divide,  # Granite: logits / scaling
}
"""What models apply to the head's output, by the config attribute that holds its constant (unset or
None: not applied)."""


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def logit_transform(config: object) -> LogitTransform:
    """`g` for a model with transformers config `config` (its text config where it has one): the
    transform of `LOGIT_TRANSFORMS` whose constant the config sets, else the identity."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute, transform in LOGIT_TRANSFORMS.items():
        constant = getattr(text_config, attribute, None)
        if constant is not None:
            return partial(transform, constant)
    return _identity


def reproduces_the_model(transform: LogitTransform, head_output: torch.Tensor, model_logits: torch.Tensor) -> bool:
    """Whether `transform` of the head's output on a row gives the logits the model returned for it."""
    with torch.no_grad():
        ours = transform(head_output).float()
        theirs = model_logits.float()
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)


def chunked_cross_entropy(
    head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk_rows: int, transform: LogitTransform = _identity
) -> torch.Tensor:
    """Mean cross-entropy of `transform(head(rows))` against `targets` (rows N × d, targets N), at most
    `chunk_rows` rows of logits at a time (see the module docstring). Equals
    `F.cross_entropy(transform(head(rows)).float(), targets)` to float32 rounding."""
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_rows):
        chunk, chunk_targets = rows[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_loss, head, transform, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _summed_loss(head, transform, chunk, chunk_targets)
    return total / len(rows)


def _summed_loss(head: nn.Module, transform: LogitTransform, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(rows.unsqueeze(0)))  # 1 × c × V, the shape the model gives its head
    return SummedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets)


class SummedCrossEntropy(torch.autograd.Function):
    """Σ_i −log softmax(z_i)[y_i] over the rows of logits z (c × V), in float32, with one c × V tensor
    made in backward: ∂/∂z_i = softmax(z_i) − e_{y_i} = exp(z_i − lse_i) − e_{y_i}, written in place in
    one buffer. It keeps z and lse (c numbers): two c × V tensors at most. torch's cross-entropy keeps
    log-softmax(z) instead of z and makes three c × V tensors in backward (torch 2.13: the gradient
    of its log-probabilities, a temporary, the gradient of z)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        wide = logits.float()
        log_normaliser = torch.logsumexp(wide, dim=-1)
        ctx.save_for_backward(logits, targets, log_normaliser)
        return (log_normaliser - wide.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, log_normaliser = ctx.saved_tensors
        gradient = torch.sub(logits.float(), log_normaliser.unsqueeze(1)).exp_()
        gradient[torch.arange(len(targets), device=targets.device), targets] -= 1
        return gradient.mul_(grad).to(logits.dtype), None
