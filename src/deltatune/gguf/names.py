"""GGUF tensor names → the model's state-dict names, the map transformers' `get_gguf_hf_weights_map`
gives, built with one `gguf` name table.

transformers maps each state-dict name of the model (`model.layers.0.self_attn.q_proj.weight`) through the
`gguf` package's table for the architecture (`blk.0.attn_q.weight`), then does the same for each submodule
with the names relative to it (for models whose table names a submodule's tensors), a name found higher
up winning; it builds the table again for every submodule (~400 times for SmolLM2, ~10 s). The same map
comes here from one table: the modules are visited in the same order (each module, then its children's
subtrees in turn), and a GGUF name keeps the first state-dict name it was found for."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import DeltaTuneError

SUFFIXES = (".weight", ".bias")


def _split(name: str) -> tuple[str, str]:
    """A state-dict name as (module part, `.weight` / `.bias` or "")."""
    return (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if name.endswith(SUFFIXES) else (name, "")


def gguf_architecture(architecture: str) -> Any:
    """The gguf package's `MODEL_ARCH` of GGUF architecture name `architecture` (`llama`), None if it has none."""
    import gguf

    return next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture), None)


def gguf_tensor_names(model: nn.Module, architecture: str) -> dict[str, str]:
    """{GGUF tensor name: the model's state-dict name} for a file of GGUF `architecture`."""
    import gguf

    arch = gguf_architecture(architecture)
    if arch is None:
        raise DeltaTuneError(
            f"the installed gguf package does not know the GGUF architecture {architecture!r}; upgrade it: "
            "pip install -U gguf"
        )
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    state_names = list(model.state_dict())
    mapped: dict[str, str] = {}
    for prefix, _ in model.named_modules(remove_duplicate=False):
        start = f"{prefix}." if prefix else ""
        level: dict[str, str] = {}
        for full_name in state_names:
            if not full_name.startswith(start):
                continue
            module_part, suffix = _split(full_name[len(start) :])
            gguf_name = table.get_name(module_part)
            if gguf_name is not None:
                level[gguf_name + suffix] = full_name
        for gguf_name, full_name in level.items():
            mapped.setdefault(gguf_name, full_name)
    return mapped
