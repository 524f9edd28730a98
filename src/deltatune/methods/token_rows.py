"""Trained rows of an embedding: only chosen tokens train, and only their rows are saved (peft's
trainable tokens, `TrainableTokensLayer`).

    E' = E with rows i₁..i_k replaced by R        R: k × d, starts as E[i₁..i_k] (a no-op until it trains)

The adapter replaces rows, it does not add to them (peft's choice, and the reason: a user who resized
the embeddings for new tokens gets fresh random rows on every reload; replaced rows make the adapter
give the same output on all of them). At an embedding, positions holding a chosen token get their row
of R (times the layer's `embed_scale`, as Gemma's scaled embeddings); at an output head that shares
the embedding's weight (tied), the logits of the chosen tokens are recomputed with R: x Rᵀ (+ b). The
head's adapter holds the embedding's R itself (the same parameter), so both see the same trained rows.
Nothing of size vocabulary × d is built in a forward call (peft copies the whole weight per call).

Merging writes R into the weight rows (`RowValues`: merge keeps the k rows it overwrote and unmerge puts
them back, bit-exactly, as peft restores its saved rows); with tied weights that also changes the head,
which is then what the head's adapter computed. Two active adapters that share an index: the later one in
activation order sets it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..site_adapter import RowValues, SiteAdapter, put_rows
from .base import lookup_type


class TokenRows(SiteAdapter):
    """The trained rows `rows` (k × d) of tokens `token_indices` of a module's weight (vocabulary × d).

    `shared`: another adapter's `rows` to use instead of a new one (a head tied to the embedding);
    `saves_shared`: whether such an adapter still stores the rows (peft's TRAINABLE_TOKENS files do,
    LoRA's `trainable_token_indices` files do not)."""

    delta_reads_module = True

    def __init__(
        self,
        module: nn.Module,
        token_indices: list[int],
        init_weights: bool = True,
        shared: nn.Parameter | None = None,
        saves_shared: bool = False,
    ) -> None:
        super().__init__()
        weight = module.weight
        vocabulary = weight.shape[0]
        outside = [index for index in token_indices if not 0 <= index < vocabulary]
        if outside:
            raise UnsupportedModuleError(
                f"token index {outside[0]} is outside the {vocabulary} rows of the {type(module).__name__}; "
                "give indices of existing tokens, or resize the embeddings first (model.resize_token_embeddings)"
            )
        indices = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        slots = torch.full((vocabulary,), -1, dtype=torch.long, device=weight.device)
        slots[indices] = torch.arange(len(token_indices), device=weight.device)
        self.register_buffer("token_indices", indices, persistent=False)
        self.register_buffer("slot_of_token", slots, persistent=False)
        """Row of R for every token of the vocabulary, −1 for tokens that keep the weight's row."""
        self.is_shared = shared is not None
        self.saves_shared = saves_shared
        self.merges_tied_weights = False
        """Set by the method when every module sharing this weight holds an adapter sharing these rows."""
        if shared is not None:
            self.rows = shared
        elif init_weights:
            self.rows = nn.Parameter(weight.detach()[indices].clone())
        else:
            self.rows = nn.Parameter(
                torch.randn(len(token_indices), weight.shape[1], dtype=weight.dtype, device=weight.device)
            )

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.numel()}, shared={self.is_shared}"

    def delta_parameters(self, module: nn.Module) -> dict[str, RowValues]:
        """Rows `token_indices` of the weight set to R; nothing for an adapter sharing another's rows
        (that adapter's delta writes the shared weight)."""
        if self.is_shared:
            return {}
        return {"weight": RowValues(self.token_indices, self.rows.detach())}

    def file_state(self) -> dict[str, torch.Tensor]:
        return {} if self.is_shared and not self.saves_shared else {"rows": self.rows}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            with torch.no_grad():
                self.rows.copy_(tensors["rows"])


class EmbeddingTokenRows(TokenRows):
    """At an `nn.Embedding`: positions holding a chosen token get its row of R."""

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        token_ids = args[0] if args else kwargs["input"]
        slots = self.slot_of_token[token_ids]
        rows = F.embedding(slots.clamp(min=0), self.rows)
        scale = getattr(module, "embed_scale", None)
        if scale is not None:
            rows = rows * torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
        return torch.where(slots.unsqueeze(-1) >= 0, rows.to(output.dtype), output)


class HeadTokenRows(TokenRows):
    """At an output head (`nn.Linear`, weight vocabulary × d): the chosen tokens' logits are x Rᵀ (+ b)."""

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0] if args else kwargs["input"]
        bias = None if module.bias is None else module.bias[self.token_indices].to(self.rows.dtype)
        logits = F.linear(hidden.to(self.rows.dtype), self.rows, bias)
        return put_rows(output, logits, self.token_indices, dim=-1)


TOKEN_ROW_TYPES: dict[type | str, type[TokenRows]] = {nn.Embedding: EmbeddingTokenRows, nn.Linear: HeadTokenRows}
"""Layer type → its adapter: embeddings, and output heads (a head tied to an embedding)."""


def token_rows_for(module: nn.Module, module_name: str) -> type[TokenRows]:
    """The adapter class for `module`, or a clear error for a layer that has no token rows."""
    adapter_class = lookup_type(TOKEN_ROW_TYPES, type(module), None)
    if adapter_class is None:
        raise UnsupportedModuleError(
            f"trainable tokens need an nn.Embedding or an output head (nn.Linear); {module_name!r} is a "
            f"{type(module).__name__}: name the model's embedding layer instead"
        )
    return adapter_class
