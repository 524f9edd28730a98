"""The transformers config of a GGUF file, from the header deltatune has already read (`header.py`).

transformers builds a GGUF file's config (`AutoConfig.from_pretrained(..., gguf_file=...)`) by parsing the
whole file with `gguf.GGUFReader` and decoding every metadata value, the tokenizer's vocabulary and merges
included: for SmolLM2-135M that is a second parse of the file, ~175 MiB at its peak and ~10 s. For the
architectures whose config transformers takes from the metadata by its key table alone (`PLAIN_CONFIG`),
the same config is built here from that table (`GGUF_CONFIG_MAPPING`: `general.*`, `tokenizer.ggml.*`
ids and the architecture's own keys), with the head tied where the file has no `output.weight`, as
transformers does. Every other file (an architecture transformers renames or adjusts: a llama file of a
Mistral, T5, MoE models...; or one without a vocabulary size key, which transformers counts from the
tokenizer's vocabulary) gets transformers' own config. A config transformers cannot build from the file's
values (an architecture it does not know, a value its validation refuses) is refused naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DeltaTuneError
from .header import GGUFHeader

BUILD_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError)
"""What transformers' config and model classes raise for values they cannot build from."""
PLAIN_CONFIG = frozenset({"llama", "qwen2"})
"""GGUF architectures whose config is the plain key mapping (tests/test_gguf_header.py checks each against
transformers' own)."""


def _config_dict(header: GGUFHeader) -> dict[str, Any]:
    from transformers.integrations import GGUF_CONFIG_MAPPING

    settings: dict[str, Any] = {"tie_word_embeddings": all(tensor.name != "output.weight" for tensor in header.tensors)}
    for key, value in header.metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:
            settings[renamed] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return settings


def uses_plain_config(header: GGUFHeader) -> bool:
    """Whether transformers builds this file's config by its key table alone (not a renamed Mistral, and
    the vocabulary size given by a key)."""
    name = str(header.metadata.get("general.name", ""))
    sized = f"{header.architecture}.vocab_size" in header.metadata
    return header.architecture in PLAIN_CONFIG and sized and "mistral" not in name.lower()


def build_errors() -> tuple[type[Exception], ...]:
    """The exceptions transformers raises for a config or model it cannot build from a file's values (its config
    classes' validation errors among them, where the installed huggingface_hub has them)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return BUILD_ERRORS
    return (*BUILD_ERRORS, StrictDataclassError)


def unbuildable(path: Path, error: Exception) -> DeltaTuneError:
    """The one-line refusal of a file whose metadata transformers cannot build a config or model from."""
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DeltaTuneError(
        f"{path.name}: its metadata does not describe a model transformers can build ({said}); write the file "
        "again, or load it with a transformers that knows its architecture"
    )


def gguf_config(header: GGUFHeader, path: Path, **config_settings: Any) -> Any:
    """The config transformers builds for GGUF file `path` (whose header is `header`), updated with
    `config_settings`; one that transformers cannot build is refused (`unbuildable`)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        if not uses_plain_config(header):
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **config_settings)
        settings = _config_dict(header)
        return CONFIG_MAPPING[settings.pop("model_type")].from_dict(settings, **config_settings)
    except build_errors() as error:
        raise unbuildable(path, error) from error
