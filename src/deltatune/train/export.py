"""`deltatune export ADAPTER --gguf OUT.gguf [--base MODEL]`: an adapter folder as a llama.cpp LoRA file,
with an Ollama `Modelfile` beside it.

The adapter is loaded onto its base (`--base`: a model folder, a packaged name such as smollm2, or a
.gguf file; by default the base the adapter folder records), so that its layers are read as the model
computes them (`deltatune.gguf.lora_export`). The Modelfile names the base GGUF file (`FROM`) where one is
known (a .gguf base, or a packaged model's GGUF file), else the base folder, which Ollama imports itself:

    FROM /path/to/base.gguf
    ADAPTER ./OUT.gguf

`ollama create NAME -f Modelfile` then builds the adapted model. The GGUF file and the Modelfile are
written together or not at all; an existing OUT or Modelfile (a user's own) is kept unless `--overwrite`.
An export never writes into its inputs, whatever `--overwrite` says: OUT (and its Modelfile) must not be
the base's GGUF file, nor lie inside the adapter folder or a base folder (compared after resolving links,
as `deltatune merge` compares its OUT, `outputs.RELATIONS`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_files
from ..errors import DeltaTuneError, OutputFolderError
from ..folder_summary import describe_folder
from ..io import CONFIG_FILE
from ..single_adapter import single_adapter_folder
from .models import GGUF_SUFFIX, PACKAGED_GGUF
from .outputs import RELATIONS

if TYPE_CHECKING:
    from ..model import DeltaModel

MODELFILE = "Modelfile"


@dataclasses.dataclass(frozen=True)
class ExportedAdapter:
    """What `export_adapter` wrote: the GGUF file, its Modelfile, the base it names and the tensor count."""

    path: Path
    modelfile: Path
    base: str
    tensors: int


def recorded_base(adapter: str | Path) -> str:
    """The base model an adapter folder records (`base_model_name_or_path`); refused where it has none."""
    describe_folder(adapter)  # refuses what is no adapter folder
    base = json.loads((Path(adapter) / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise DeltaTuneError(f"{adapter} does not record its base model; pass --base MODEL (a folder, name or .gguf)")
    return str(base)


def _packaged_name(base: str) -> str | None:
    """The packaged model `base` names, or whose converted folder it is (found without converting anything)."""
    from .smollm2 import FOLDER_NAME, cache_root

    if base in PACKAGED_GGUF:
        return base
    return "smollm2" if Path(base).resolve() == (cache_root() / FOLDER_NAME).resolve() else None


def base_gguf_file(base: str) -> Path | None:
    """The GGUF file of base `base`: itself if it is one, a packaged model's file (named, or its converted
    folder), else None."""
    if base.endswith(GGUF_SUFFIX):
        return Path(base).resolve()
    name = _packaged_name(base)
    return PACKAGED_GGUF[name]().resolve() if name is not None else None


def modelfile_text(base: str, adapter_file: str) -> str:
    """An Ollama Modelfile: FROM the base's GGUF file (else its folder), ADAPTER the exported file beside it."""
    gguf_base = base_gguf_file(base)
    source = str(gguf_base) if gguf_base is not None else str(Path(base).resolve())
    return f"FROM {source}\nADAPTER ./{adapter_file}\n"


def _load_base(base: str):
    if base.endswith(GGUF_SUFFIX):
        from ..gguf import load_gguf_model

        return load_gguf_model(base)
    from .models import load_model

    return load_model(base)


def write_gguf_adapter(delta_model: DeltaModel, name: str, out: Path, base: str, dtype: str = "f32") -> ExportedAdapter:
    """Write adapter `name` of `delta_model` (on `base`) as llama.cpp LoRA file `out`, and a Modelfile beside it."""
    from ..gguf.lora_export import gguf_writer, lora_tensors

    content = lora_tensors(delta_model, name, dtype)
    modelfile = modelfile_text(base, out.name)
    write_files(
        out.parent,
        {out.name: gguf_writer(content, out.stem), MODELFILE: lambda path: Path(path).write_text(modelfile)},
    )
    return ExportedAdapter(out, out.parent / MODELFILE, base, len(content.tensors))


def _inputs(adapter: str | Path, base: str) -> dict[str, Path]:
    """{role: path} of what an export reads: the adapter folder, the base's GGUF file and a base folder."""
    inputs = {"adapter folder": Path(adapter)}
    gguf_base = base_gguf_file(base)
    if gguf_base is not None:
        inputs["base file"] = gguf_base
    if Path(base).is_dir():
        inputs["base folder"] = Path(base)
    return inputs


def _check_outputs(outputs: list[Path], inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse outputs (OUT.gguf first) that meet an input (whatever `overwrite` says), that are folders, or
    that exist without `overwrite`."""
    out = outputs[0]
    if out.suffix != GGUF_SUFFIX:
        raise OutputFolderError(f"--gguf {out} should name a .gguf file")
    for path in outputs:
        target = path.resolve()
        for role, source in inputs.items():
            relation = next((words for words, holds in RELATIONS.items() if holds(target, source.resolve())), None)
            if relation:
                raise OutputFolderError(
                    f"export never writes over its inputs: {path} {relation} the {role} {source}; give --gguf a "
                    "file outside them"
                )
        other = "file name" if path == out else "folder"
        if path.is_dir():
            raise OutputFolderError(f"{path} is a folder, which export never replaces; give --gguf another {other}")
        if path.exists() and not overwrite:
            raise OutputFolderError(f"{path} exists; pass --overwrite to replace it, or give --gguf another {other}")


def export_merged(
    adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "f16", overwrite: bool = False
) -> Path:
    """Write the GGUF base (`base`, else the adapter's own) with adapter folder `adapter` merged in to `out`."""
    from ..gguf.merged_export import check_merged_dtype, export_merged_gguf

    check_merged_dtype(dtype)  # before anything loads
    folder = single_adapter_folder(adapter)
    out, base = Path(out), base or recorded_base(folder)
    _check_outputs([out], _inputs(adapter, base), overwrite)
    return export_merged_gguf(base_gguf_file(base) or base, adapter, out, dtype)


def export_adapter(
    adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "f32", overwrite: bool = False
) -> ExportedAdapter:
    """Write the adapter folder `adapter` as llama.cpp LoRA file `out` and a Modelfile beside it."""
    from .. import load
    from ..gguf.lora_export import check_adapter_dtype

    check_adapter_dtype(dtype)  # before anything loads
    folder = single_adapter_folder(adapter)
    out, base = Path(out), base or recorded_base(folder)
    _check_outputs([out, out.parent / MODELFILE], _inputs(adapter, base), overwrite)
    delta_model = load(_load_base(base), str(adapter))
    (name,) = delta_model.configs
    return write_gguf_adapter(delta_model, name, out, base, dtype)
