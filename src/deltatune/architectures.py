"""Where a transformer's blocks and sublayers are: the site map the adapter family hooks into.

A transformer block has two sublayers, attention and feed-forward (FFN). For each, an adapter needs

    output      the module whose output is h, the sublayer's result before the residual add
                (BERT: `attention.output.dropout`, Llama: `self_attn.o_proj`, GPT-2: `mlp.c_proj`)
    input       the module whose input is x, the residual stream entering the sublayer: the sublayer
                itself in post-LN models, its pre-norm in pre-LN ones (Llama: `input_layernorm`)
    layer_norm  post-LN models only: the norm that computes LN(h + x) after the sublayer

`ARCHITECTURES` lists these per `model_type`; block lists are matched as the end of a module name, so
one entry serves every head class (`BertModel`, `BertForSequenceClassification`, ...). An unknown
model falls back to a search: a `ModuleList` whose blocks each have an attention-like child
(`attn`, `attention`, ...) and an FFN-like child (`mlp`, `ffn`, `feed_forward`, ...); the last
linear layer inside each is its output, and the sublayer itself its input. Where that fails, the
adapter config's `architecture` field names the modules (keys as in `ARCHITECTURE_KEYS`).
Layers are numbered in model order over all block lists (T5 and BART: the encoder's first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import DeltaTuneError
from .targeting import linear_types, model_modules

SUBLAYERS = ("attention", "ffn")
ARCHITECTURE_KEYS = (
    "blocks",
    "attention_output",
    "attention_input",
    "attention_layer_norm",
    "ffn_output",
    "ffn_input",
    "ffn_layer_norm",
    "input_argument",
)


@dataclass(frozen=True)
class Sublayer:
    """One sublayer of a block; module paths are relative to the block."""

    output: str
    input: str
    layer_norm: str | None = None
    input_argument: str = "hidden_states"
    """The keyword under which `input` receives x when it is not passed positionally."""


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one `ModuleList` (`blocks`, matched as a name suffix) and their sublayers."""

    blocks: str
    attention: Sublayer
    ffn: Sublayer


@dataclass(frozen=True)
class SublayerSite:
    """One sublayer of one block, with full module names."""

    block: str
    layer: int
    kind: str
    output: str
    input: str
    layer_norm: str | None
    input_argument: str


def _post_ln(
    blocks: str, attention: tuple[str, str, str], ffn: tuple[str, str, str], argument: str = "hidden_states"
) -> BlockLayout:
    return BlockLayout(blocks, Sublayer(*attention, input_argument=argument), Sublayer(*ffn))


def _pre_ln(blocks: str, attention: tuple[str, str], ffn: tuple[str, str]) -> BlockLayout:
    return BlockLayout(blocks, Sublayer(*attention), Sublayer(*ffn))


_BERT = (
    _post_ln(
        "encoder.layer",
        ("attention.output.dropout", "attention", "attention.output.LayerNorm"),
        ("output.dropout", "intermediate", "output.LayerNorm"),
    ),
)
_LLAMA = (_pre_ln("layers", ("self_attn.o_proj", "input_layernorm"), ("mlp.down_proj", "post_attention_layernorm")),)
_BART = tuple(
    _post_ln(
        f"{stack}.layers",
        ("self_attn.out_proj", "self_attn", "self_attn_layer_norm"),
        ("fc2", "fc1", "final_layer_norm"),
    )
    for stack in ("encoder", "decoder")
)

ARCHITECTURES: dict[str, tuple[BlockLayout, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), _LLAMA),
    **dict.fromkeys(("bart", "mbart"), _BART),
    "distilbert": (
        _post_ln(
            "transformer.layer",
            ("attention.out_lin", "attention", "sa_layer_norm"),
            ("ffn.lin2", "ffn", "output_layer_norm"),
            argument="query",
        ),
    ),
    "gpt2": (_pre_ln("h", ("attn.c_proj", "ln_1"), ("mlp.c_proj", "ln_2")),),
    "t5": (
        _pre_ln("encoder.block", ("layer.0.dropout", "layer.0.layer_norm"), ("layer.1.dropout", "layer.1.layer_norm")),
        _pre_ln("decoder.block", ("layer.0.dropout", "layer.0.layer_norm"), ("layer.2.dropout", "layer.2.layer_norm")),
    ),
}
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]

_ATTENTION_NAME = re.compile(r"(self_?)?(attn|attention|self_attention)", re.IGNORECASE)
_FFN_NAME = re.compile(r"mlp|ffn|feed_?forward|ff", re.IGNORECASE)


def sublayer_sites(model: nn.Module, override: dict[str, str] | None = None) -> list[SublayerSite]:
    """Every sublayer of every block of `model`, in model order (attention before FFN)."""
    layouts = _layouts(model, override)
    modules = dict(model_modules(model))
    sites: list[SublayerSite] = []
    for layer, (block, layout) in enumerate(_blocks(modules, layouts)):
        for kind in SUBLAYERS:
            sublayer: Sublayer = getattr(layout, kind)
            names = [sublayer.output, sublayer.input] + ([sublayer.layer_norm] if sublayer.layer_norm else [])
            missing = [name for name in names if f"{block}.{name}" not in modules]
            if missing:
                raise DeltaTuneError(
                    f"block {block!r} has no module {missing[0]!r} that the {kind} site map names; set the "
                    f"adapter config's architecture={{...}} (keys: {', '.join(ARCHITECTURE_KEYS)})"
                )
            full = lambda name: f"{block}.{name}" if name else None  # noqa: E731
            sites.append(
                SublayerSite(
                    block,
                    layer,
                    kind,
                    full(sublayer.output),
                    full(sublayer.input),
                    full(sublayer.layer_norm),
                    sublayer.input_argument,
                )
            )
    return sites


def block_names(model: nn.Module, override: dict[str, str] | None = None) -> list[str]:
    """Full names of the blocks, in layer order."""
    return [block for block, _ in _blocks(dict(model_modules(model)), _layouts(model, override))]


def layer_of(block_list: list[str], module_name: str) -> int | None:
    """The layer index of the block that holds `module_name` (None outside blocks)."""
    for index, block in enumerate(block_list):
        if module_name.startswith(block + "."):
            return index
    return None


def sublayer_output_width(model: nn.Module, output_module: nn.Module) -> int:
    """Width of a sublayer's output: a linear layer's out features (a quantized layer's logical ones: its
    stored weight is packed), else the model config's hidden size."""
    from .quantized import quantized_linear  # quantized imports methods.base, which imports this module

    row = quantized_linear(output_module)
    if row is not None:
        return row.out_features(output_module)
    weight = getattr(output_module, "weight", None)
    if isinstance(output_module, linear_types()) and weight is not None:
        return weight.shape[0] if isinstance(output_module, nn.Linear) else weight.shape[1]
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size is None:
        raise DeltaTuneError(
            f"cannot tell the hidden size at {type(output_module).__name__}; name a linear layer as the "
            "sublayer output in the adapter config's architecture={...}"
        )
    return size


def _layouts(model: nn.Module, override: dict[str, str] | None) -> tuple[BlockLayout, ...]:
    if override:
        return (_layout_from_override(override),)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    found = _discover(model)
    if not found:
        raise DeltaTuneError(
            f"cannot find transformer blocks in {type(model).__name__} (model_type {model_type!r}): no "
            "ModuleList whose blocks hold an attention and an FFN child. Set the adapter config's "
            'architecture={"blocks": <ModuleList name>, "attention_output": ..., "ffn_output": ..., '
            '"attention_input": ..., "ffn_input": ...} with module paths inside a block '
            f"(all keys: {', '.join(ARCHITECTURE_KEYS)})"
        )
    return found


def check_override(override: dict[str, str]) -> None:
    """Raise unless `override` has the required keys and no unknown ones."""
    unknown = sorted(set(override) - set(ARCHITECTURE_KEYS))
    required = [key for key in ("blocks", "attention_output", "ffn_output") if key not in override]
    if unknown or required:
        raise DeltaTuneError(
            f"architecture={override!r}: {'unknown keys ' + str(unknown) if unknown else 'missing ' + str(required)}; "
            f"the keys are {', '.join(ARCHITECTURE_KEYS)} (blocks, attention_output and ffn_output are required)"
        )


def _layout_from_override(override: dict[str, str]) -> BlockLayout:
    check_override(override)

    def sublayer(kind: str) -> Sublayer:
        output = override[f"{kind}_output"]
        return Sublayer(
            output,
            override.get(f"{kind}_input", output.rsplit(".", 1)[0] if "." in output else output),
            override.get(f"{kind}_layer_norm"),
            override.get("input_argument", "hidden_states"),
        )

    return BlockLayout(override["blocks"], sublayer("attention"), sublayer("ffn"))


def _blocks(modules: dict[str, nn.Module], layouts: tuple[BlockLayout, ...]) -> list[tuple[str, BlockLayout]]:
    found: list[tuple[str, BlockLayout]] = []
    for layout in layouts:
        lists = [
            name
            for name, module in modules.items()
            if isinstance(module, nn.ModuleList) and (name == layout.blocks or name.endswith("." + layout.blocks))
        ]
        for list_name in lists:
            found += [(f"{list_name}.{index}", layout) for index in range(len(modules[list_name]))]
    if not found:
        raise DeltaTuneError(
            f"the model has no block list named {', '.join(repr(layout.blocks) for layout in layouts)}; set the "
            f"adapter config's architecture={{...}} (keys: {', '.join(ARCHITECTURE_KEYS)})"
        )
    return found


def _discover(model: nn.Module) -> tuple[BlockLayout, ...]:
    """Block layouts of an unknown model, found by child names (see the module docstring)."""
    layouts = []
    for name, module in model_modules(model):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        layout = _discover_block(name.rsplit(".", 1)[-1], module[0])
        if layout is not None and all(type(block) is type(module[0]) for block in module):
            layouts.append(layout)
    return tuple(layouts)


def _discover_block(list_name: str, block: nn.Module) -> BlockLayout | None:
    children = dict(block.named_children())
    attention = next((child for child in children if _ATTENTION_NAME.fullmatch(child)), None)
    ffn = next((child for child in children if _FFN_NAME.fullmatch(child)), None)
    if attention is None or ffn is None:
        return None
    outputs = [_last_linear(children[attention]), _last_linear(children[ffn])]
    if None in outputs:
        return None
    return BlockLayout(
        list_name, Sublayer(f"{attention}.{outputs[0]}", attention), Sublayer(f"{ffn}.{outputs[1]}", ffn)
    )


def _last_linear(module: nn.Module) -> str | None:
    kinds = linear_types()
    names = [name for name, inner in module.named_modules() if name and isinstance(inner, kinds)]
    return names[-1] if names else None


def input_of(args: tuple, kwargs: dict[str, Any], argument: str) -> Any:
    """x from a module call: the first positional input, or the keyword `argument`."""
    return args[0] if args else kwargs[argument]
