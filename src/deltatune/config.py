"""Config base classes: plain dataclasses with a `method` key, JSON round trip and early validation.

`DeltaConfig` holds what every method shares (`modules_to_save`); `TargetedConfig` adds the fields that
pick modules (`target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`). Field names
follow peft's where the concept is the same, so a peft `adapter_config.json` maps over one to one.

Making a config checks it in three steps: every field against its annotation (type and range, see
`deltatune.field_check`; this covers the fields of configs that users register too), then `normalise`
brings the accepted forms into one (a single name becomes a list), then `validate` applies the rules
that tie fields together.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

from .field_check import NonNegativeInt, Regex, check_fields


@dataclasses.dataclass
class DeltaConfig:
    """Base of every method's config. `method` is set when the method is registered."""

    method: ClassVar[str] = ""

    modules_to_save: list[str] | str | None = None
    """Modules (suffix match, like `target_modules`) that train fully, one copy per adapter: a
    classification head, for example. One name stands for a list of one."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.normalise()
        self.validate()

    def normalise(self) -> None:
        """Bring values of the accepted types into one form. Subclasses extend this."""
        self.modules_to_save = _as_name_list(self.modules_to_save)

    def validate(self) -> None:
        """Raise `DeltaTuneError` on values that cannot work together. Subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the method name under `"method"`."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build from a dict; unknown keys are dropped with a warning naming them."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=2)
        return cls(**{key: value for key, value in data.items() if key in names})

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class TargetedConfig(DeltaConfig):
    """A config whose method adapts chosen modules of the model."""

    target_modules: list[str] | Regex | None = None
    """A list of module names, each matched as a suffix of the full name (`"q_proj"` matches
    `model.layers.0.self_attn.q_proj`); or one string, matched with `re.fullmatch` against full names;
    or `"all-linear"`: every linear layer but the output head. `None`: the method's default for the
    model type. Every list entry must match at least one module."""

    exclude_modules: list[str] | Regex | None = None
    """Modules to leave out, with the same matching rules as `target_modules`."""

    layers_to_transform: list[NonNegativeInt] | NonNegativeInt | None = None
    """Adapt only the blocks with these indices (the number after `layers_pattern` in a name)."""

    layers_pattern: list[str] | str | None = None
    """Name of the block list (`"layers"`, `"h"`, `"layer"`, `"block"`); found by itself when `None`."""

    def normalise(self) -> None:
        super().normalise()
        if not isinstance(self.target_modules, str):
            self.target_modules = _as_name_list(self.target_modules)
        if not isinstance(self.exclude_modules, str):
            self.exclude_modules = _as_name_list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        elif self.layers_to_transform is not None:
            self.layers_to_transform = list(self.layers_to_transform)
        self.layers_pattern = _as_name_list(self.layers_pattern)


def _as_name_list(value: list[str] | tuple[str, ...] | set[str] | str | None) -> list[str] | None:
    """One name, or a list/tuple/set of names, as a list (sets sorted, so JSON stays stable)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
