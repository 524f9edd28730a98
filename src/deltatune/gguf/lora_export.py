"""A LoRA adapter as a llama.cpp LoRA GGUF file (what `llama-cli --lora FILE` and Ollama's `ADAPTER` load).

llama.cpp's adapter loader (`src/llama-adapter.cpp`) reads:
- `general.architecture`, equal to the base GGUF's; `general.type = "adapter"`; `adapter.type = "lora"`;
  `adapter.lora.alpha` (float32). A layer's scale is then α / r, r taken from the layer's own tensors.
- per adapted layer, the pair `<base tensor>.lora_a` / `.lora_b`, `<base tensor>` being the base GGUF's
  name (`blk.3.attn_q.weight`). In ggml's order (fastest dimension first) lora_a is [in, r] and lora_b
  [r, out]; the `gguf` writer reverses numpy's shape, so lora_a is A (r × in) and lora_b is B (out × r)
  as they are, with no transpose.

So the file computes y = W x + (α / r) · B A x at each layer, which is LoRA's y = W x + s · B A x when
α = s · r. One α serves the whole file: it is the config's (lora_alpha; with rsLoRA, s = lora_alpha / √r,
so α = lora_alpha · √r), and a layer whose scale differs (`rank_pattern`, `alpha_pattern`) gets its B
multiplied by s · r / α, which keeps its s · B A. A lora_alpha of 0 is refused: llama.cpp reads an α of 0 as
none (scale 1, `scale = alpha ? alpha / rank : 1`).

llama.cpp stores a Llama's q and k projection rows permuted per head (`loader.ROW_PERMUTED`; its rotary
layout). The low-rank term's output rows are B's rows, so B is permuted as the base's rows were
(transformers' rows (h, i, j) → llama.cpp's (h, j, i), i ∈ {0, 1}); A is left as it is.

Only what llama.cpp can express is written: plain low-rank B A terms on linear layers whose base tensor
a llama.cpp model has. DoRA, PiSSA / OLoRA / KaSA (their frozen start rewrites W), trained biases, token
rows, full module copies, embeddings and convolutions are refused, each by name, with nothing written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..adapter_tensors import non_finite
from ..atomic import write_files
from ..errors import DeltaTuneError
from ..methods.lora_config import LoraConfig
from .loader import ROW_PERMUTED, require_gguf
from .names import gguf_tensor_names

if TYPE_CHECKING:
    from ..model import DeltaModel
    from ..site_adapter import SiteAdapter

LLAMACPP_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""transformers `model_type` → the GGUF architecture llama.cpp's converter writes for it (SmolLM2 is a
`llama`; a Mistral is converted as a llama, q and k rows permuted)."""
GGUF_DTYPES = {"f32": np.float32, "f16": np.float16}
"""`--dtype` names → the numpy type the factors are written in (llama.cpp's converter writes f32 by default)."""


class GGUFExportError(DeltaTuneError):
    """An adapter (or model) that a llama.cpp GGUF file cannot hold; nothing was written."""


@dataclasses.dataclass(frozen=True)
class LoraTensors:
    """What one llama.cpp LoRA file holds: the architecture, α, and {tensor name: array} in file order."""

    architecture: str
    alpha: float
    tensors: dict[str, np.ndarray]


def _refusals() -> dict[type, str]:
    """Adapter layer types a llama.cpp LoRA cannot express → what they are, for the error."""
    from ..methods.dora import DoraConv, DoraEmbedding, DoraLinear, DoraQuantizedLinear
    from ..methods.lora import LoraConv, LoraEmbedding
    from ..methods.lora_init import LoraResidualLinear
    from ..methods.lora_kasa_layer import KasaLinear
    from ..methods.lora_mha import LoraMultiheadAttention
    from ..methods.lora_mica import MicaEmbedding
    from ..methods.lora_parameter import LoraParameters
    from ..methods.module_copy import ModuleCopy

    dora = "DoRA (a trained magnitude rescales W + ΔW per row; merge it instead: deltatune merge)"
    residual = "{} (its frozen start B₀A₀ is taken out of W; deltatune.to_plain_lora makes the plain rank-2r LoRA)"
    return {
        **dict.fromkeys((DoraLinear, DoraQuantizedLinear, DoraEmbedding, DoraConv), dora),
        LoraResidualLinear: residual.format("PiSSA / OLoRA"),
        KasaLinear: residual.format("KaSA"),
        **dict.fromkeys((LoraEmbedding, MicaEmbedding), "LoRA on an embedding"),
        LoraConv: "LoRA on a convolution",
        LoraMultiheadAttention: "LoRA on nn.MultiheadAttention",
        LoraParameters: "LoRA on bare parameters (target_parameters)",
        ModuleCopy: "a full trained copy of the module (modules_to_save)",
    }


def _exportable() -> tuple[type, ...]:
    """Layer types whose change is exactly s · up_projection() down_projection() on a linear layer."""
    from ..methods.lora import LoraLinear, LoraQuantizedLinear
    from ..methods.lora_block_diagonal_layers import BlockDiagonalDown, BlockDiagonalUp
    from ..methods.lora_init import LoraOrthogonalLinear
    from ..methods.lora_mica import MicaLinear

    return (LoraLinear, LoraQuantizedLinear, LoraOrthogonalLinear, MicaLinear, BlockDiagonalDown, BlockDiagonalUp)


def gguf_architecture(model: torch.nn.Module) -> str:
    """The GGUF architecture of a transformers model of the Llama family; other models are refused."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LLAMACPP_ARCHITECTURES:
        raise GGUFExportError(
            f"llama.cpp LoRA export supports the Llama family ({', '.join(LLAMACPP_ARCHITECTURES)}), and this model is "
            f"{model_type or type(model).__name__!r}; keep the adapter in peft format for it"
        )
    return LLAMACPP_ARCHITECTURES[model_type]


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' per-head row order (h, i, j) → llama.cpp's (h, j, i), i ∈ {0, 1}: what its converter
    does to a Llama's q and k rows (`loader._unpermute_rows` is the inverse)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, -1).transpose(1, 2).reshape(rows.shape)


def _check_layer(module_name: str, adapter: SiteAdapter, exportable: tuple[type, ...]) -> None:
    kind = type(adapter)
    if kind not in exportable:
        what = _refusals().get(kind, f"a {kind.__name__} layer (not a plain low-rank B A)")
        raise GGUFExportError(
            f"{module_name} holds {what}, which a llama.cpp LoRA file cannot express; nothing written"
        )
    if adapter.lora_B_bias is not None or adapter.trained_bias is not None:
        option = "lora_bias" if adapter.lora_B_bias is not None else "bias"
        raise GGUFExportError(
            f"{module_name} trains a bias ({option}), which a llama.cpp LoRA file cannot express; train without it, or "
            "merge the adapter instead (deltatune merge); nothing written"
        )


def file_alpha(config: LoraConfig) -> float:
    """The one α of the file: s · r for the config's own r and lora_alpha (lora_alpha; rsLoRA: lora_alpha · √r)."""
    return config.lora_alpha * math.sqrt(config.r) if config.use_rslora else float(config.lora_alpha)


def check_adapter_dtype(dtype: str) -> None:
    """Refuse a `--dtype` that an adapter file's factors are not written in (before anything loads)."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF adapter dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")


def lora_tensors(delta_model: DeltaModel, name: str, dtype: str = "f32") -> LoraTensors:
    """The tensors and α of adapter `name` as llama.cpp reads them (module docstring); refuses what it cannot hold."""
    delta_model.require([name])
    config = delta_model.configs[name]
    if not isinstance(config, LoraConfig):
        raise GGUFExportError(
            f"adapter {name!r} is {config.method}, and llama.cpp's adapter files hold LoRA only; merge it into the "
            "model instead (deltatune merge); nothing written"
        )
    check_adapter_dtype(dtype)
    model = delta_model.base_model
    architecture = gguf_architecture(model)
    gguf_names = {state: gguf_name for gguf_name, state in gguf_tensor_names(model, architecture).items()}
    permuted = ROW_PERMUTED.get(architecture, {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    alpha, exportable = file_alpha(config), _exportable()
    if alpha == 0:
        raise GGUFExportError(
            f"adapter {name!r} has lora_alpha 0, the α of a llama.cpp LoRA file, which llama.cpp reads as no α (scale "
            "1); export it merged instead (deltatune export --merged --gguf, or deltatune merge); nothing written"
        )
    tensors: dict[str, np.ndarray] = {}
    for module_name, site in delta_model.sites():
        if name not in site.adapters:
            continue
        adapter = site.adapters[name]
        _check_layer(module_name, adapter, exportable)
        base_name = gguf_names.get(f"{module_name}.weight")
        if base_name is None or (tied and base_name == "output.weight"):
            reason = "the head is tied to the embedding" if base_name else "it has no tensor of its own there"
            raise GGUFExportError(
                f"{module_name} has no llama.cpp {architecture} tensor to adapt ({reason}); train the adapter without "
                "it; nothing written"
            )
        down = adapter.down_projection().detach().float().cpu()
        up = adapter.up_projection().detach().float().cpu()
        if non_finite(down) or non_finite(up):
            raise GGUFExportError(
                f"{module_name}: adapter {name!r} holds non-finite values (NaN or inf), so nothing was written; the "
                "run that trained it likely diverged: lower the learning rate and train again"
            )
        factor = adapter.scaling * down.shape[0] / alpha
        if factor != 1.0:
            up = up * factor
        heads = [field for part, field in permuted.items() if part in f".{base_name}"]
        if heads:
            up = permute_rows(up, getattr(model.config, heads[0]))
        tensors[f"{base_name}.lora_a"] = _file_array(f"{module_name} lora_A", down, dtype)
        tensors[f"{base_name}.lora_b"] = _file_array(f"{module_name} lora_B", up, dtype)
    if not tensors:
        raise GGUFExportError(f"adapter {name!r} adapts no layer; nothing to export")
    return LoraTensors(architecture, alpha, tensors)


def _file_array(label: str, values: torch.Tensor, dtype: str) -> np.ndarray:
    """`values` (finite) as the file's array; refuses values that `dtype` cannot hold (float16: |x| > 65504)."""
    array = values.contiguous().numpy().astype(GGUF_DTYPES[dtype])
    if not np.isfinite(array).all():
        raise GGUFExportError(
            f"{label} holds values up to {values.abs().max().item():.4g}, beyond {dtype}'s range, so nothing was "
            "written; export with --dtype f32"
        )
    return array


def gguf_writer(content: LoraTensors, title: str):
    """A writer (path → None) of the llama.cpp LoRA GGUF file holding `content`, named `title`."""
    require_gguf()

    def write(path: str) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, content.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, content.alpha)
        writer.add_name(title)
        for tensor_name, values in content.tensors.items():
            writer.add_tensor(tensor_name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write


def export_lora_gguf(delta_model: DeltaModel, name: str, out: str | Path, dtype: str = "f32") -> LoraTensors:
    """Write adapter `name` of `delta_model` to `out` as a llama.cpp LoRA GGUF file (whole or not at all)."""
    out = Path(out)
    content = lora_tensors(delta_model, name, dtype)
    write_files(out.parent, {out.name: gguf_writer(content, out.stem)})
    return content
