"""Which peft release introduced which key of `adapter_config.json` (and the few settings that need a newer
release than their key), so that `format="peft"` files hold only what their oldest reader knows.

How the table was obtained: peft 0.3.0, 0.4.0, ... 0.21.0 (the first release of every minor line) were each
installed apart beside transformers 4.57 and the fields of their config classes listed with
`dataclasses.fields()`; a key's release is the first of those that has the field (a key that came in a
patch release is given the next minor one: late, never early). The settings (`SETTING_RELEASES`) and what
config and weights need together (`FOLDER_RULES`: LoKr's scale, the layer kinds LoRA and DoRA wrap) were read
in the same releases' sources. Adapters of every listed type load only from peft 0.4.0 on: 0.3 reads
`adapter_model.bin` alone. Checked by loading (a tiny Llama, transformers 4.57): LoRA and prompt tuning in
0.4.0, 0.6.0, 0.11.0, 0.13.2 and 0.19.0 to 0.21.0, DoRA from 0.9.0, with deltatune's outputs
(tests/test_peft_old_release.py); 0.14 to 0.18 could not import their LoRA layers beside that environment's
torchao, so for them the table is read, not run.

How a release treats a key it does not know: 0.3 to 0.5 set only the keys their class has (an unknown key
is dropped without a word: a DoRA file read there is a plain LoRA), 0.6 to 0.13 raise TypeError
(`Config(**data)`), 0.14 on drop it with a warning. So a file leaves out every key that holds the value all
releases read in its absence (`Key.absent_reads`); a key set otherwise stays, and the file then needs the
release that introduced it.

`peft_version` (0.18 on) holds the version that saved a file, and peft reads it to tell old files from new:
0.21's OFT refuses a Cayley-Neumann adapter saved before 0.18 (absent: before 0.18), whose series differed.
deltatune writes it only where the file needs 0.18 or later anyway, and then as the release whose
behaviour deltatune reproduces (`peft_format.PEFT_VERSION`), never as an older one a later peft could take
for another behaviour; older readers never see it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import AdapterFileError
from .files import tensor_shapes

Shapes = Mapping[str, Sequence[int]]
"""Tensor name → shape of a peft folder's weights (`adapter_model.safetensors` keys)."""

ALWAYS_WRITTEN = object()
"""`Key.absent_reads` of a key whose absence no one value describes: it is never left out."""

NEWEST_LISTED = "0.21.0"
"""The newest release the table was made from: a key it does not know needs at least this one."""


@dataclasses.dataclass(frozen=True)
class Key:
    """A config key that came after its peft type: the release that introduced it, and the value that every
    release reads when the file lacks it (the older ones behave so, the newer ones default to it)."""

    release: str
    absent_reads: Any = ALWAYS_WRITTEN


FIRST_READERS = {
    "LORA": "0.4.0",
    "ADALORA": "0.4.0",
    "PROMPT_TUNING": "0.4.0",
    "P_TUNING": "0.4.0",
    "PREFIX_TUNING": "0.4.0",
    "IA3": "0.4.0",
    "LOHA": "0.6.0",
    "LOKR": "0.6.0",
    "VERA": "0.12.0",
    "LN_TUNING": "0.11.0",
    "OFT": "0.14.0",
    "TRAINABLE_TOKENS": "0.15.0",
}
"""peft type → the first release that reads its folders (0.4.0: the first to read `adapter_model.safetensors`;
OFT: 0.14.0, whose block-size parametrisation replaced the one before, which peft 0.21 refuses too; VeRA: 0.12.0,
since 0.11 refuses layers of several shapes and the weights cannot prove one: λ_b gives a layer's output size only,
the shared A its largest input size)."""

_BASE = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")
_LORA = (
    *_BASE,
    *("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias", "modules_to_save"),
    *("init_lora_weights", "layers_to_transform", "layers_pattern"),
)
_SOFT_PROMPT = (
    *_BASE,
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
)
_LYCORIS = (
    *_BASE,
    *("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights", "rank_pattern"),
    *("alpha_pattern", "target_modules", "layers_to_transform", "layers_pattern", "modules_to_save"),
)
FIRST_KEYS: dict[str, tuple[str, ...]] = {
    "LORA": _LORA,
    "ADALORA": (*_LORA, "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
    + ("total_step", "rank_pattern"),
    "PROMPT_TUNING": (*_SOFT_PROMPT, "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"),
    "P_TUNING": (*_SOFT_PROMPT, "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers")
    + ("encoder_dropout",),
    "PREFIX_TUNING": (*_SOFT_PROMPT, "encoder_hidden_size", "prefix_projection"),
    "IA3": (*_BASE, "target_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save", "init_ia3_weights"),
    "LOHA": _LYCORIS,
    "LOKR": (*_LYCORIS, "decompose_both", "decompose_factor"),
    "VERA": (*_BASE, "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial")
    + ("fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern"),
    "LN_TUNING": (*_BASE, "target_modules", "modules_to_save"),
    "OFT": (*_BASE, "r", "oft_block_size", "module_dropout", "target_modules", "fan_in_fan_out", "bias")
    + ("exclude_modules", "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "coft")
    + ("eps", "block_share"),
    "TRAINABLE_TOKENS": (*_BASE, "token_indices", "target_modules", "init_weights"),
}
"""peft type → the keys its first reader (`FIRST_READERS`) already knows."""

_EVERY_TYPE = {"peft_version": Key("0.18.0")}  # written by `lean_config`'s own rule, see the module docstring
_EXCLUDE = {"exclude_modules": Key("0.14.0", None)}
_LORA_LATER = {
    **_EVERY_TYPE,
    **_EXCLUDE,
    "rank_pattern": Key("0.6.0", {}),
    "alpha_pattern": Key("0.6.0", {}),
    "megatron_config": Key("0.7.0", None),
    "megatron_core": Key("0.7.0", "megatron.core"),
    "loftq_config": Key("0.7.0", {}),
    "use_rslora": Key("0.8.0", False),
    "use_dora": Key("0.9.0", False),
    "layer_replication": Key("0.10.0", None),
    "runtime_config": Key("0.12.0"),
    "eva_config": Key("0.14.0", None),
    "lora_bias": Key("0.14.0", False),
    "trainable_token_indices": Key("0.15.0", None),
    "corda_config": Key("0.15.0", None),
    "use_qalora": Key("0.16.0", False),
    "qalora_group_size": Key("0.16.0", 16),
    "target_parameters": Key("0.17.0", None),
    "alora_invocation_tokens": Key("0.18.0", None),
    "arrow_config": Key("0.18.0", None),
    "ensure_weight_tying": Key("0.18.0", False),
    "lora_ga_config": Key("0.19.0", None),
    "use_bdlora": Key("0.19.0", None),
    "velora_config": Key("0.20.0", None),
    "monteclora_config": Key("0.20.0", None),
    "kasa_config": Key("0.21.0", None),
}
_PROMPT_LATER = {**_EVERY_TYPE, "modules_to_save": Key("0.17.0", None)}
LATER_KEYS: dict[str, dict[str, Key]] = {
    "LORA": _LORA_LATER,
    "ADALORA": {key: entry for key, entry in _LORA_LATER.items() if key != "rank_pattern"},
    "PROMPT_TUNING": {**_PROMPT_LATER, "tokenizer_kwargs": Key("0.7.0", None)},
    "P_TUNING": _PROMPT_LATER,
    "PREFIX_TUNING": {**_PROMPT_LATER, "init_weights": Key("0.19.0", None)},
    "IA3": {**_EVERY_TYPE, **_EXCLUDE},
    "LOHA": {**_EVERY_TYPE, **_EXCLUDE},
    "LOKR": {**_EVERY_TYPE, **_EXCLUDE, "rank_dropout_scale": Key("0.14.0", False)},
    "VERA": _EVERY_TYPE,
    "LN_TUNING": {**_EVERY_TYPE, **_EXCLUDE},
    "OFT": {
        **_EVERY_TYPE,
        "use_cayley_neumann": Key("0.16.0"),  # absent: the exact Cayley transform before 0.16, the series after
        "num_cayley_neumann_terms": Key("0.16.0", 5),
    },
    "TRAINABLE_TOKENS": _EVERY_TYPE,
}
"""peft type → {key its first reader lacks: when it came, what its absence reads as}."""

INIT_RELEASES = {
    "gaussian": "0.7.0",
    "loftq": "0.7.0",
    "pissa": "0.11.0",
    "olora": "0.12.0",
    "eva": "0.14.0",
    "corda": "0.15.0",
    "orthogonal": "0.16.0",
    "lora_ga": "0.19.0",
    "mica": "0.20.0",
}
"""`init_lora_weights` value (or prefix: "pissa_niter_4") → the first release that knows it; 0.7 to 0.13
raise on a value they do not know, and a base-rewriting one (PiSSA, OLoRA) must be redone by the reader."""


def _init_release(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    name = str(value).lower()
    return next((release for prefix, release in INIT_RELEASES.items() if name.startswith(prefix)), None)


def _full_name_patterns(value: Any) -> str | None:
    """deltatune writes `rank_pattern` / `alpha_pattern` keys as escaped full module names; peft matches a key
    as `(.*\\.)?key$` from 0.15 on, and before as `.*\\.key$`, which needs a dot in front of the key: a full
    name never matched (a rank pattern then fails to load, an alpha pattern is ignored without a word). For
    a pattern that names a suffix ("q_proj", as peft users write them) this is later than needed, never earlier."""
    return "0.15.0" if value else None


def _trained_biases(value: Any) -> str | None:
    """A LoRA module's own bias is `<path>.base_layer.bias` from 0.7 on (the wrapper holds its base layer);
    0.6 and before named it `<path>.bias`."""
    return "0.7.0" if value not in (None, "none") else None


def _cayley_series(value: Any) -> str | None:
    """The Cayley-Neumann series of 0.18 on (0.16 and 0.17 summed another one; 0.21 refuses their files)."""
    return "0.18.0" if value else None


def _sampled_prompt(value: Any) -> str | None:
    return "0.18.0" if str(getattr(value, "value", value)).upper() == "SAMPLE_VOCAB" else None


SETTING_RELEASES: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "LORA": {
        "init_lora_weights": _init_release,
        "rank_pattern": _full_name_patterns,
        "alpha_pattern": _full_name_patterns,
        "bias": _trained_biases,
    },
    "ADALORA": {"init_lora_weights": _init_release},
    "OFT": {"use_cayley_neumann": _cayley_series},
    "PROMPT_TUNING": {"prompt_tuning_init": _sampled_prompt},
}
"""peft type → {key: the release a value of it needs (None: no more than the key's)}."""

LORA_LAYER_RELEASES = {"linear": "0.4.0", "transposed": "0.4.0", "embedding": "0.4.0", "conv2d": "0.4.0"}
LORA_LAYER_RELEASES |= {"conv3d": "0.14.0", "conv1d": "0.15.0", "multihead_attention": "0.15.0"}
DORA_LAYER_RELEASES = {"linear": "0.9.0", "conv2d": "0.10.0", "transposed": "0.11.0", "embedding": "0.13.0"}
DORA_LAYER_RELEASES |= {"conv3d": "0.14.0", "conv1d": "0.16.0"}
"""Layer kind → the first release whose LoRA (DoRA) wraps it: before, it refuses the layer (DoRA on an Embedding
in 0.9 to 0.12, LoRA on an nn.MultiheadAttention in 0.13 and 0.14, checked by loading) or crashes on it (DoRA on
GPT-2's in × out Conv1D, "transposed", in 0.9 and 0.10). No release's DoRA wraps a MultiheadAttention."""

_A_WEIGHT_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
"""Dimensions of a layer's `lora_A.weight` → its kind (a conv's A has the layer's kernel)."""


MHA_OUT_PROJ_A = ".base_layer.out_proj.lora_A.weight"
"""The end of the key of an nn.MultiheadAttention's output-projection factor, beside the in-projection's own
`<mha>.lora_A.weight` (peft's LoRA wraps the attention module and, inside it, its `out_proj` Linear)."""


def _lora_layers(data: dict[str, Any], shapes: Shapes) -> str | None:
    """The release whose LoRA, or DoRA with `use_dora`, wraps every layer kind the weights hold. A
    MultiheadAttention's 2-D factors look like a Linear's; its keys tell it: `<mha>.lora_A.weight` beside
    `<mha>.base_layer.out_proj.lora_A.weight`."""
    kinds = {"embedding" for name in shapes if name.endswith("lora_embedding_A")}
    attention = {name.removesuffix(MHA_OUT_PROJ_A) for name in shapes if name.endswith(MHA_OUT_PROJ_A)}
    for name, shape in shapes.items():
        if name.endswith("lora_A.weight"):
            kind = _A_WEIGHT_KINDS.get(len(shape), "unknown")
            if name.removesuffix(".lora_A.weight").removesuffix(".base_layer.out_proj") in attention:
                kind = "multihead_attention"
            kinds.add("transposed" if kind == "linear" and data.get("fan_in_fan_out") else kind)
    releases = DORA_LAYER_RELEASES if data.get("use_dora") else LORA_LAYER_RELEASES
    return max((releases.get(kind, NEWEST_LISTED) for kind in kinds), key=release_of, default=None)


def _lokr_scale(data: dict[str, Any], shapes: Shapes) -> str | None:
    """ΔW = (alpha / r) · W1 ⊗ W2 from 0.14 on; 0.6 to 0.13 compute W1 ⊗ W2 alone and so load a folder whose scale
    is not 1 as another model, without a word. Any alpha or rank pattern counts as a scale (late, never early)."""
    scaled = data.get("alpha") != data.get("r") or data.get("alpha_pattern") or data.get("rank_pattern")
    return "0.14.0" if scaled else None


FOLDER_RULES: dict[str, Callable[[dict[str, Any], Shapes], str | None]] = {"LORA": _lora_layers, "LOKR": _lokr_scale}
"""peft type → the release its config and weights together need (None: no more than the keys')."""


def release_of(version: Any) -> tuple[int, ...]:
    """(major, minor) of a peft version string ("0.21.2", "0.18.0.dev0@abc"); (0, 0) when there is none."""
    parts = str(version or "0.0").partition("@")[0].split(".")[:2]
    return tuple(int(part) if part.isdigit() else 0 for part in parts)


def required_release(data: dict[str, Any], shapes: Shapes) -> str | None:
    """The oldest peft release that reads `adapter_config.json` data `data` with weights of `shapes` as written:
    one that knows its peft type, each of its keys and each setting, computes its scale and wraps its layer
    kinds; None for a peft type the table does not list."""
    peft_type = data.get("peft_type")
    if peft_type not in FIRST_READERS:
        return None
    later, settings = LATER_KEYS[peft_type], SETTING_RELEASES.get(peft_type, {})
    needed = [FIRST_READERS[peft_type]]
    for key, value in data.items():
        if key in later:
            needed.append(later[key].release)
        elif key not in FIRST_KEYS[peft_type]:
            needed.append(NEWEST_LISTED)
        if key in settings and (release := settings[key](value)) is not None:
            needed.append(release)
    if peft_type in FOLDER_RULES and (release := FOLDER_RULES[peft_type](data, shapes)) is not None:
        needed.append(release)
    return max(needed, key=release_of)


def lean_config(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys that hold what every release reads in their absence, and with `peft_version`
    only where the rest needs peft 0.18 or later; as it is for a peft type the table does not list."""
    peft_type = data.get("peft_type")
    if peft_type not in FIRST_READERS:
        return data
    kept = {key: value for key, value in data.items() if key == "peft_version" or not _unused(peft_type, key, value)}
    without_version = {key: value for key, value in kept.items() if key != "peft_version"}
    # without weights: no layer kind or scale needs 0.18 (FOLDER_RULES stop at 0.16)
    if release_of(required_release(without_version, {})) < release_of(LATER_KEYS[peft_type]["peft_version"].release):
        return without_version
    return kept


def _unused(peft_type: str, key: str, value: Any) -> bool:
    """Whether every release reads `key` = `value` as it reads a file without the key: the key holds what
    its absence reads as, or it is no key of the type at all and holds null (trainable tokens have no
    `modules_to_save`)."""
    later = LATER_KEYS[peft_type].get(key)
    if later is None:
        return value is None and key not in FIRST_KEYS[peft_type]
    absent = later.absent_reads
    return absent is not ALWAYS_WRITTEN and type(value) is type(absent) and value == absent


PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""The weights files of a peft folder, in the order peft looks for them."""


def minimum_peft_version(folder: str | Path) -> str | None:
    """The oldest peft release that loads the peft adapter folder `folder` as it is (None: a peft type this
        table does not list). Releases before 0.14 refuse (0.6 to 0.13) or silently drop (0.3 to 0.5) keys they
        do not know; 0.14 on drop them with a warning, which can change what the adapter computes. The weights'
    names and shapes, read from the file's header, tell the layer kinds (`FOLDER_RULES`)."""
    config_file = Path(folder) / "adapter_config.json"
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise AdapterFileError(
            f"cannot read {config_file} ({error}); pass a peft adapter folder, the one holding adapter_config.json"
        ) from error
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterFileError(f"{config_file} is not a peft adapter config (it has no peft_type); pass a peft folder")
    weights = next((path for path in map(Path(folder).joinpath, PEFT_WEIGHT_FILES) if path.is_file()), None)
    if weights is None:
        raise AdapterFileError(
            f"{folder} holds no {' or '.join(PEFT_WEIGHT_FILES)}; pass a complete peft adapter folder"
        )
    return required_release(data, tensor_shapes(weights))
