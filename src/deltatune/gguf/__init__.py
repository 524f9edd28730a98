"""GGUF bases kept quantized: llama.cpp's block formats dequantized in torch (`blocks`), frozen layers over
the blocks (`GGUFLinear`, `GGUFEmbedding`) and the loader that builds a transformers model from a GGUF file
with its linear weights left in their blocks (`load_gguf_model`). Needs the `gguf` package to read files."""

from .blocks import BLOCK_FORMATS, dequantize_rows
from .embedding import GGUFEmbedding
from .linear import GGUFLinear
from .loader import load_gguf_model

__all__ = ["BLOCK_FORMATS", "GGUFEmbedding", "GGUFLinear", "dequantize_rows", "load_gguf_model"]
