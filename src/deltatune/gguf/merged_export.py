"""A GGUF base with an adapter merged in, as a new llama.cpp model file at f16 or q8_0.

The base file's metadata (architecture, sizes, tokenizer, chat template) is copied as it is, but for
`general.file_type`. A base's own `general.alignment` is kept as the writer's alignment, so that the key the
header declares and the padding the data is laid out with agree (copied as a plain key, it would declare 64
over data padded to the writer's 32, and every tensor offset would be off).

The weights come from deltatune's own merge: the base is loaded from the file with its blocks kept
(`load_gguf_model`), the adapter merged with `unload(merge=True, dequantize=True)` (every layer
dequantized, W + ΔW added in float32), and each of the file's tensors is written again from the merged
model's tensor of the same name (`names.gguf_tensor_names`), a Llama's q and k rows put back in
llama.cpp's order (`lora_export.permute_rows`). Matrices are written in the asked type (q8_0 where the row
length is a multiple of its 32-value blocks, else f16), vectors (norms) in F32; a tensor the model does
not hold (llama.cpp's `rope_freqs`) is copied with its bytes. A merged value past what its type holds (f16:
65504), which the float32 merge cannot see, is refused by the tensor's name rather than written as inf.

The file keeps the base file's tensor list, so a tensor the merge gives the model that the base file has
no tensor for is refused by name, with nothing written, rather than left out: a trained bias on a
bias-free Llama layer (LoRA's `lora_bias`, BitFit's `add_missing_bias`) or a task head. It is not added
either: transformers builds a GGUF Llama from the file's metadata, which has no bias flag, and would drop
it, so the file would compute one model in llama.cpp and another in transformers. A tied head is held by
the embedding's tensor.

A merged model needs no adapter support in the runtime; what the adapter may be is what `deltatune merge`
takes (any mergeable method). A non-GGUF base has no tokenizer metadata to copy and is refused: merge it
with `deltatune merge` and convert that folder with llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ..atomic import write_files
from ..single_adapter import single_adapter_folder
from .loader import ROW_PERMUTED, load_gguf_model, require_gguf
from .lora_export import GGUFExportError, permute_rows
from .names import gguf_tensor_names

MERGED_TYPES = ("f16", "q8_0")
"""`--dtype` names of a merged file."""
FLOAT16_MAX = float(np.finfo(np.float16).max)
"""The largest f16 value (65504); a q8_0 block's scale (its largest |value| / 127) is an f16 too."""


def _file_type(dtype: str) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def check_merged_dtype(dtype: str) -> None:
    """Refuse a `--dtype` that a merged file is not written in (before anything loads)."""
    if dtype not in MERGED_TYPES:
        raise GGUFExportError(f"a merged GGUF is written as {' or '.join(MERGED_TYPES)}, not {dtype!r}")


def _copy_metadata(reader: Any, writer: Any, dtype: str) -> None:
    import gguf

    writer.add_file_type(_file_type(dtype))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue  # the header's own fields, and what is written above or by the writer itself
        if key == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))  # the key and the data's padding together
            continue
        element = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=element)


def _encoded(name: str, values: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array to write, its raw ggml type or None) for float32 tensor `name` in the asked type; refuses values
    beyond what that type holds, which it would write as inf."""
    import gguf

    if values.ndim < 2:
        return values.astype(np.float32), None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    blocks = values.shape[-1] % block == 0
    quantized = dtype == "q8_0" and blocks
    largest = np.abs(values).max(initial=0.0)
    if not largest <= FLOAT16_MAX * (127 if quantized else 1):
        other = "export with --dtype q8_0, or " if blocks and not quantized else ""
        raise GGUFExportError(
            f"merged tensor {name} holds values up to {largest:.4g}, beyond what {'q8_0' if quantized else 'f16'} "
            f"holds, so nothing was written: {other}keep the adapter unmerged (deltatune export --gguf writes its "
            "factors in f32)"
        )
    if quantized:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return values.astype(np.float16), None


def _without_a_place(state: dict[str, torch.Tensor], written: set[str]) -> list[str]:
    """The entries of `state` that no written entry holds (a tied head shares its embedding's storage)."""
    held = {state[name].data_ptr() for name in written}
    return [name for name, tensor in state.items() if name not in written and tensor.data_ptr() not in held]


def _refuse_lost(base_file: Path, lost: list[str], names: dict[str, str]) -> NoReturn:
    """Refuse a merge whose tensors `lost` (state-dict names) would be left out of a copy of `base_file`."""
    gguf_names = {state_name: gguf_name for gguf_name, state_name in names.items()}
    shown = ", ".join(f"{name} ({gguf_names[name]})" if name in gguf_names else name for name in lost[:3])
    raise GGUFExportError(
        f"{base_file} has no tensor for {shown}{', ...' if len(lost) > 3 else ''}, which merging the adapter gives "
        "the model (a trained bias on a bias-free layer, from lora_bias or add_missing_bias, or a task head), so "
        "the merged file would compute another model: use the adapter unmerged (deltatune.load it onto the base), "
        "or train it without that part; nothing was written"
    )


def merged_writer(base_file: Path, merged: torch.nn.Module, dtype: str):
    """A writer (path → None) of GGUF file `base_file` with its weights taken from the merged model `merged`."""
    require_gguf()
    import gguf

    check_merged_dtype(dtype)
    reader = gguf.GGUFReader(str(base_file))
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    names = gguf_tensor_names(merged, architecture)
    state = merged.state_dict()
    lost = _without_a_place(state, {names[tensor.name] for tensor in reader.tensors if tensor.name in names})
    if lost:
        _refuse_lost(base_file, lost, names)
    permuted = ROW_PERMUTED.get(architecture, {})

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, architecture)
        _copy_metadata(reader, writer, dtype)
        for tensor in reader.tensors:
            if tensor.name not in names:
                writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
                continue
            values = state[names[tensor.name]].detach().float()
            heads = [field for part, field in permuted.items() if part in f".{tensor.name}"]
            if heads:
                values = permute_rows(values, getattr(merged.config, heads[0]))
            array, raw_type = _encoded(tensor.name, values.contiguous().numpy(), dtype)
            writer.add_tensor(tensor.name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write


def export_merged_gguf(base_file: str | Path, adapter: str | Path, out: str | Path, dtype: str = "q8_0") -> Path:
    """Write GGUF base `base_file` with the adapter folder `adapter` merged in to `out` (whole or not at all)."""
    from .. import load

    base_file, out = Path(base_file), Path(out)
    check_merged_dtype(dtype)
    if base_file.suffix != ".gguf":
        raise GGUFExportError(
            f"--merged --gguf copies the tokenizer and settings of a GGUF base, and {base_file} is none: pass --base "
            "FILE.gguf, or merge with deltatune merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    single_adapter_folder(adapter)
    merged = load(load_gguf_model(base_file), str(adapter)).unload(merge=True, dequantize=True)
    write_files(out.parent, {out.name: merged_writer(base_file, merged, dtype)})
    return out
