"""Registry of KV-cache methods: name -> configured instance.

Adding a method = adding one module that defines a `Method` subclass and decorates it with
`@register("name")`, and listing the module in `_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_MODULES = ("full", "omnikv", "streaming", "h2o", "snapkv", "quest")
_loaded = False


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODULES:
        try:
            importlib.import_module(f"omnikv.methods.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"omnikv.methods.{mod}":
                raise
    _loaded = True


def available_methods() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_method(name: str | Method, *, budget: int | float | None = None, **options: Any) -> Method:
    """A configured method by registry name (options are the method's constructor arguments)."""
    if isinstance(name, Method):
        return name
    _load()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    try:
        return cls(budget=budget, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None


__all__ = ["Method", "available_methods", "get_method", "register"]
