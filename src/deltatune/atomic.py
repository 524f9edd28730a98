"""Writes that never leave a half-written adapter.

Every file of a save is first written completely into a staging folder beside the target (same file
system); only then are the files renamed into place, one `os.replace` each. An error while writing
leaves the old folder untouched; other files in the target folder are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

Writer = Callable[[str], None]


def write_files(folder: Path, writers: dict[str, Writer]) -> None:
    """Write `{file name: writer(temporary path)}` into `folder`, all or (until the renames) nothing.
    Files are renamed in the order given: put the file that marks a complete save last."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for file_name, write in writers.items():
            write(str(staging / file_name))
            with open(staging / file_name, "rb") as written:
                os.fsync(written.fileno())
        folder.mkdir(exist_ok=True)
        for file_name in writers:
            os.replace(staging / file_name, folder / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def json_writer(data: dict[str, Any]) -> Writer:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, sort_keys=True)
            file.write("\n")

    return write


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Writer:
    """safetensors of detached, contiguous CPU copies (no pickling, no shared storage)."""
    plain = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    return lambda path: save_file(plain, path, metadata=metadata)
