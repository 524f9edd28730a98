"""The method registry: `@register("name")` adds a method without any edit to the library.

A method is a class that follows `deltatune.methods.base.Method`. Registering it also stamps its config
class with the method name, so a config knows which method reads it (`config.method`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import MethodNameError, UnknownMethodError

if TYPE_CHECKING:
    from .config import DeltaConfig
    from .methods.base import Method

_METHODS: dict[str, Method] = {}

MethodClass = TypeVar("MethodClass", bound=type)


def register(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: make a method available under `name` (config files refer to it by that name)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise MethodNameError(f"method name {name!r} must be letters, digits, '_' or '-'")

    def decorate(method_class: MethodClass) -> MethodClass:
        config_class = getattr(method_class, "config_class", None)
        if config_class is None:
            raise TypeError(f"{method_class.__name__} needs a `config_class` attribute to be registered")
        if name in _METHODS and type(_METHODS[name]) is not method_class:
            raise MethodNameError(
                f"method name {name!r} is already taken by {type(_METHODS[name]).__name__}; pick another name"
            )
        config_class.method = name
        _METHODS[name] = method_class()
        return method_class

    return decorate


def get_method(name: str) -> Method:
    """The registered method called `name`; the error lists the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _METHODS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}. "
            "A method defined outside the library must be registered with @deltatune.register(name) "
            "before it is used."
        ) from None


def method_for(config: DeltaConfig) -> Method:
    """The method that reads `config`."""
    return get_method(config.method)


def registered_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Rebuild a config from its JSON form (`{"method": ..., ...}`)."""
    if "method" not in data:
        raise UnknownMethodError("the adapter config has no 'method' key; it was not written by deltatune")
    return get_method(data["method"]).config_class.from_dict(data)
