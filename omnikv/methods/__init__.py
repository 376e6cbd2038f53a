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
    static = options.pop("static", None)
    compile_ = options.pop("compile", None)
    backend = options.pop("compile_backend", None)
    mode = options.pop("compile_mode", None)
    for key, value in (("static", static), ("compile", compile_)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
    if (static or compile_ or backend or mode) and not cls.supports_static:
        supported = ", ".join(n for n in available_methods() if _REGISTRY[n].supports_static)
        raise ConfigError(
            f"method {name!r} cannot be compiled: its decode step changes shape from step to step. "
            f"static=true / compile=true work with: {supported}"
        )
    try:
        method = cls(budget=budget, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None
    method.compile = bool(compile_) or bool(backend) or bool(mode)
    method.static = bool(static) or method.compile
    method.compile_backend, method.compile_mode = backend, mode
    return method


def make_decoder(method: Method, model, cache):
    """The `omnikv.static.StaticDecoder` that drives `cache` when `method` is static or
    compiled; None otherwise (the model's own forward is used)."""
    if not method.static:
        return None
    from omnikv.static import StaticDecoder

    return StaticDecoder(model, cache, compile=method.compile, backend=method.compile_backend,
                         mode=method.compile_mode, method=method.name)


__all__ = ["Method", "available_methods", "get_method", "register"]
