"""Which modules of a model a config selects.

Rules (peft's, made strict):
- a list entry matches a module whose full name equals it or ends with `"." + entry`;
- a single string is a regular expression matched with `re.fullmatch` against full names;
- `"all-linear"` selects every linear layer except the output head and `modules_to_save`;
- `layers_to_transform` keeps modules inside the numbered blocks listed;
- a module in `modules_to_save`, and every module inside it, trains fully and gets no adapter (as in
  peft, where the saved copy wins);
- every target list entry must match something, and a selected module must be of a type the method
  adapts: otherwise the error names the entry, close module names and the supported types. An
  `exclude_modules` entry that matches nothing warns, as in peft.
Modules that deltatune itself added (adapter sites) are never candidates.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from .config import DeltaConfig, TargetedConfig
from .errors import TargetConflictError, TargetNotFoundError, UnsupportedModuleError
from .site import DeltaSite

ALL_LINEAR = "all-linear"
DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "block", "blocks")


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` without deltatune's own sites and what they hold. It never walks into a
    site, so its cost does not grow with the number of adapters."""
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen or isinstance(module, DeltaSite):
            continue
        seen.add(id(module))
        yield name, module
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module._modules.items()
            if child is not None
        ]
        pending.extend(reversed(children))


def linear_types() -> tuple[type, ...]:
    """The layer types "all-linear" means: torch's Linear and transformers' GPT-2 style Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (`lm_head`), which "all-linear" leaves alone."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def matches(name: str, spec: list[str] | str) -> bool:
    """Whether a full module name is selected by a list of suffixes or a full-match pattern."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def layer_index(name: str, layer_patterns: Iterable[str] | None) -> int | None:
    """The block number in a module name (`model.layers.3.mlp` -> 3), or None outside blocks."""
    patterns = "|".join(re.escape(pattern) for pattern in (layer_patterns or DEFAULT_LAYER_PATTERNS))
    found = re.search(rf"(?:^|\.)(?:{patterns})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def pattern_value(patterns: dict[str, float] | dict[str, int], name: str, default):
    """peft's `rank_pattern` / `alpha_pattern` lookup: first key matching the end of the name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve_names(model: nn.Module, spec: list[str], field: str, candidates: list[str] | None = None) -> list[str]:
    """Full names matched by a list of suffixes; an entry that matches nothing is an error."""
    names = candidates if candidates is not None else [name for name, _ in model_modules(model) if name]
    for entry in spec:
        if not any(name == entry or name.endswith("." + entry) for name in names):
            raise TargetNotFoundError(_no_match_message(field, entry, names))
    return [name for name in names if matches(name, spec)]


def select_modules(
    model: nn.Module,
    config: TargetedConfig,
    supported_types: tuple[type, ...],
    default_targets: Callable[[nn.Module], list[str] | str],
) -> list[str]:
    """Full names of the modules `config` selects, in model order."""
    modules = dict((name, module) for name, module in model_modules(model) if name)
    names = list(modules)
    saved = (
        set(resolve_names(model, config.modules_to_save, "modules_to_save", names)) if config.modules_to_save else set()
    )
    target = config.target_modules if config.target_modules is not None else default_targets(model)

    if target == ALL_LINEAR or target == [ALL_LINEAR]:
        heads = output_head_names(model)
        kinds = linear_types()
        selected = [n for n in names if isinstance(modules[n], kinds) and n not in heads]
    elif isinstance(target, str):
        selected = [n for n in names if re.fullmatch(target, n)]
        if not selected:
            raise TargetNotFoundError(_no_match_message("target_modules", target, names, pattern=True))
    else:
        selected = resolve_names(model, target, "target_modules", names)

    if config.exclude_modules:
        _warn_unmatched_exclusions(config.exclude_modules, names)
        selected = [n for n in selected if not matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        selected = [n for n in selected if layer_index(n, config.layers_pattern) in wanted]
    before_saved = bool(selected)
    selected = [n for n in selected if not _inside_any(n, saved)]
    unsupported = [n for n in selected if not isinstance(modules[n], supported_types)]
    if unsupported:
        kinds = ", ".join(sorted({t.__name__ for t in supported_types}))
        raise UnsupportedModuleError(
            f"{config.method or type(config).__name__} cannot adapt {unsupported[0]!r} "
            f"({type(modules[unsupported[0]]).__name__}); it adapts {kinds}. Name the layers inside "
            f"that module instead (for example {_leaf_example(modules, unsupported[0], supported_types)})."
        )
    if not selected:
        saved_note = (
            f"; modules in modules_to_save={config.modules_to_save!r} train fully and get no adapter" if saved else ""
        )
        error = TargetConflictError if saved and before_saved else TargetNotFoundError
        raise error(
            f"the config selects no module of the model (target_modules={target!r}, "
            f"layers_to_transform={config.layers_to_transform!r}, "
            f"exclude_modules={config.exclude_modules!r}{saved_note})"
        )
    return selected


def saved_module_names(model: nn.Module, config: DeltaConfig) -> list[str]:
    """Full names of the modules in `config.modules_to_save`."""
    return resolve_names(model, config.modules_to_save, "modules_to_save") if config.modules_to_save else []


def _inside_any(name: str, saved: set[str]) -> bool:
    """Whether module `name` is one of the `saved` modules or lies inside one."""
    return any(name == entry or name.startswith(entry + ".") for entry in saved)


def _warn_unmatched_exclusions(spec: list[str] | str, names: list[str]) -> None:
    """peft's rule: an exclusion that matches no module of the model is a warning, not an error."""
    pattern = isinstance(spec, str)
    for entry in [spec] if pattern else spec:
        if not any(matches(name, entry if pattern else [entry]) for name in names):
            warnings.warn(
                _no_match_message("exclude_modules", entry, names, pattern=pattern), UserWarning, stacklevel=2
            )


def _leaf_example(modules: dict[str, nn.Module], name: str, supported_types: tuple[type, ...]) -> str:
    inside = [n for n in modules if n.startswith(name + ".") and isinstance(modules[n], supported_types)]
    return repr(inside[0].rsplit(".", 1)[-1]) if inside else "a Linear layer's name"


def _no_match_message(field: str, entry: str, names: list[str], pattern: bool = False) -> str:
    short_names = sorted({name.rsplit(".", 1)[-1] for name in names})
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], short_names, n=5, cutoff=0.5)
    if not close:
        close = short_names[:8]
    how = "as a full-match regular expression" if pattern else "as the last part of a full module name"
    return (
        f"{field} entry {entry!r} matches no module of the model (matched {how}). "
        f"Close module names: {', '.join(close)}. Print the model or call "
        "deltatune's model_modules(model) to see every name."
    )
