"""Registry of KV-cache methods: name -> configured instance.

Adding a method = adding one module to this folder that defines a `Method` dataclass and
decorates it with `@register("name")`: the registry imports every public module of the folder the
first time it is asked (`_load`), so nothing else lists the module. A module that needs an optional
package imports it where it is used (in `make_cache`), so that listing the methods never fails.
What callers need to know about a method (takes a budget? needs a real prefill? its memory plan,
its summary) they ask the method class or instance, never its name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False

# The exact method every comparison (eval fidelity, bench ratios, `omnikv compare`) is made against.
REFERENCE = "full"


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `name` -> this `Method` subclass. Two classes under one name is a bug."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) decorates Method subclasses; got {cls!r}")
        other = _REGISTRY.get(name)
        if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"method name {name!r} is registered twice: {other.__module__} and {cls.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_modules() -> list[str]:
    """The modules the registry imports: every public module of this folder."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in method_modules():
        importlib.import_module(module)
    _loaded = True


def available_methods() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class of `name` (its capabilities are class attributes); ConfigError if unknown."""
    _load()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return cls


def methods_taking(option: str) -> list[str]:
    """Registry names of the methods that accept `option`."""
    _load()
    return sorted(n for n, cls in _REGISTRY.items() if option in cls.option_names())


def get_method(name: str | Method, *, budget: int | float | None = None, **options: Any) -> Method:
    """A configured method by registry name (options are the method's dataclass fields: its own,
    and static= / compile= / compile_backend= / compile_mode=, which a method without a
    static-shape step refuses)."""
    if isinstance(name, Method):
        return name
    cls = method_class(name)
    try:
        return cls.from_options(budget=budget, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None


def make_decoder(method: Method, model, cache):
    """The `omnikv.hf.static.StaticDecoder` that drives `cache` when `method` is static or
    compiled; None otherwise (the model's own forward is used)."""
    if not method.static:
        return None
    from omnikv.hf.static import StaticDecoder

    return StaticDecoder(model, cache, compile=method.compile, backend=method.compile_backend,
                         mode=method.compile_mode, method=method.name)


__all__ = ["REFERENCE", "Method", "available_methods", "get_method", "make_decoder", "method_class", "method_modules",
           "methods_taking", "register"]
