"""A frozen token embedding over GGUF blocks: the rows of the asked tokens are gathered as blocks and only
those are dequantized (a batch of B × T tokens dequantizes B · T rows, never the whole table).

A model that ties its output head to the embedding (`tie_word_embeddings`, llama.cpp files without an
`output.weight`) gets the head as a `GGUFLinear` over the same uint8 tensor (`tied_head`): one copy of
the blocks serves both.

The blocks are the `blocks` buffer; `weight` is the whole table dequantized, made on each read and never
kept, for code that reads an embedding's table (its dtype, width or spread: the soft-prompt methods'
initialisations), which then sees the float32 table the layer computes with.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import block_format, dequantize_rows
from .linear import GGUFLinear


class GGUFEmbedding(nn.Module):
    """Token embedding whose table stays in GGUF blocks (`blocks`: uint8, num_embeddings × bytes per row)."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ggml_type = blocks.shape[0], embedding_dim, int(ggml_type)
        self.padding_idx = padding_idx
        self.register_buffer("blocks", blocks)

    @property
    def weight(self) -> torch.Tensor:
        """The table as float32 (num_embeddings × embedding_dim), dequantized on each read."""
        return dequantize_rows(self.blocks, self.ggml_type)

    @property
    def type_name(self) -> str:
        return block_format(self.ggml_type).name

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, input_ids.reshape(-1))
        return dequantize_rows(rows, self.ggml_type).reshape(*input_ids.shape, self.embedding_dim)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> nn.Embedding:
        """A plain frozen `nn.Embedding` holding this table dequantized, in `dtype`."""
        plain = nn.Embedding.from_pretrained(self.weight.to(dtype), freeze=True, padding_idx=self.padding_idx)
        return plain.train(self.training)

    def tied_head(self) -> GGUFLinear:
        """The output head x ↦ x Eᵀ over this table's blocks (no second copy)."""
        return GGUFLinear(self.blocks, self.ggml_type, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name}"
