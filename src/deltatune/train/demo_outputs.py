"""Where `deltatune demo` writes: its `--out` follows the trainer's output rules (`outputs.py`), and so do
the demo's own files there.

Besides a training run's entries (`outputs.RUN_ENTRIES`: the adapter, metrics.json, training.png), which
the trainer checks and clears, the demo writes its data split (`DATA_FILES`), the config it trains with
(`CONFIG_FILE`) and its llama.cpp adapter with a Modelfile (`GGUF_FILES`). It records each file it wrote in
`DEMO_RECORD`, with a digest of its content.

- Without `--overwrite`, an `--out` holding any of those entries is refused before anything is written,
  unless an earlier demo wrote there (its `DEMO_RECORD` is there): a demo run again replaces its own work,
  by the same rules as `--overwrite` below, so `make demo` can be run twice.
- With it, a demo file goes only where the record names it with the digest of what is there now: a file a
  user put or edited in its place is refused by name, and nothing is removed; the run's entries are cleared by
  the trainer's rules (`outputs.check_replaceable`).
- The demo never writes over its `--data` input: an input that is, or lies inside, an entry the demo writes is
  refused whatever `--overwrite` says.
- The demo writes only inside `--out` and never through a link: a symlink (dangling or not) at a demo file, at its
  `data` folder or at its record is refused in one line naming it, whatever `--overwrite` says
  (`outputs.check_no_links`, which refuses links at the run's entries too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..atomic import json_writer, write_files
from ..errors import OutputFolderError
from .config import TrainConfig
from .export import MODELFILE
from .outputs import RELATIONS, RUN_ENTRIES, RUN_RECORD, check_no_links, check_output_dir, previous_run

DATA_FOLDER = "data"
DATA_FILES = (f"{DATA_FOLDER}/train.jsonl", f"{DATA_FOLDER}/eval.jsonl")
"""The demo's train and eval split, under `--out`."""
GGUF_ADAPTER = "adapter.gguf"
GGUF_FILES = (GGUF_ADAPTER, MODELFILE)
"""The demo's llama.cpp LoRA file and its Ollama Modelfile, under `--out`."""
CONFIG_FILE = "demo.yaml"
"""The config the demo trained with, under `--out`: `deltatune eval DIR/demo.yaml` evaluates its adapter again."""
DEMO_FILES = (*DATA_FILES, CONFIG_FILE, *GGUF_FILES)
DEMO_RECORD = ".deltatune-demo.json"
"""`{"written_by": "deltatune demo", "files": {name: sha256 of its content}}`: the demo files a demo wrote."""


def check_demo_out(config: TrainConfig, data: str | None) -> TrainConfig:
    """Refuse, before anything is written, a link where the demo writes, a `--data` input the demo would write over,
    an `--out` holding earlier work without `overwrite_output_dir` (but for an earlier demo's), and any entry there
    that no deltatune run or demo wrote; returns the config to run, with `overwrite_output_dir` set where an earlier
    demo's work goes."""
    out = Path(config.output_dir)
    check_no_links(out, (*DEMO_FILES, DEMO_RECORD))
    if data is not None:
        _check_not_written(Path(data), out)
    found = previous_run(out) + [name for name in DEMO_FILES if os.path.lexists(out / name)]
    if found and not config.overwrite_output_dir and (out / DEMO_RECORD).is_file():
        config = dataclasses.replace(config, overwrite_output_dir=True)  # a demo run again replaces its own work
    if found and not config.overwrite_output_dir:
        raise OutputFolderError(
            f"--out {out} already holds {', '.join(found)}; replace what an earlier deltatune run or demo wrote "
            "there with --overwrite, or give another --out"
        )
    check_output_dir(config, resume=None)
    recorded = _recorded(out)
    foreign = [name for name in found if name in DEMO_FILES and not _unchanged(out / name, recorded.get(name))]
    if foreign:
        raise OutputFolderError(
            f"--out {out} holds files no deltatune demo wrote there: {', '.join(foreign)} (--overwrite replaces only "
            f"the files a demo's {DEMO_RECORD} names, unchanged); move them out of the folder, or give another --out"
        )
    return config


def clear_demo_files(out: Path) -> None:
    """Remove the demo files an earlier demo left in `out` (after `check_demo_out` found them unchanged) and their
    record, so that none is left stale beside this run's work."""
    for name in DEMO_FILES:
        (out / name).unlink(missing_ok=True)
    (out / DEMO_RECORD).unlink(missing_ok=True)


def record_demo_files(out: Path, names: Iterable[str]) -> None:
    """Add the files `names` of `out`, as they are now, to its demo record."""
    files = {**_recorded(out), **{name: _digest(out / name) for name in names}}
    write_files(out, {DEMO_RECORD: json_writer({"written_by": "deltatune demo", "files": files})})


def _check_not_written(data: Path, out: Path) -> None:
    """Refuse a `--data` input that is, or lies inside, an entry the demo writes or clears in `out`."""
    source = data.resolve()
    for name in (*DEMO_FILES, *RUN_ENTRIES, RUN_RECORD, DEMO_RECORD):
        entry = (out / name).resolve()
        relation = next((words for words in ("is", "is inside") if RELATIONS[words](source, entry)), None)
        if relation:
            raise OutputFolderError(
                f"--data {data} {relation} {out / name}, which the demo writes; the demo never writes over its "
                "input: copy the file out of --out, or give another --out"
            )


def _recorded(out: Path) -> dict[str, str]:
    """{demo file: digest} from `out`'s demo record (none where there is no readable record)."""
    try:
        record = json.loads((out / DEMO_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "deltatune demo" else None
    return {name: digest for name, digest in files.items() if name in DEMO_FILES} if isinstance(files, dict) else {}


def _unchanged(path: Path, digest: str | None) -> bool:
    return digest is not None and path.is_file() and not path.is_symlink() and _digest(path) == digest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
