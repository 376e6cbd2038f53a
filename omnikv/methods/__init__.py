"""Registry of KV-cache methods: name -> configured instance.

Adding a method = adding one module that defines a `Method` dataclass and decorates it with
`@register("name")`, and listing the module in `_MODULES`. What callers need to know about a
method (takes a budget? needs a real prefill? its memory plan, its summary) they ask the method
class or instance, never its name.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_MODULES = ("full", "omnikv", "streaming", "h2o", "snapkv", "quest")
_loaded = False

# The exact method every comparison (eval fidelity, bench ratios, `omnikv compare`) is made against.
REFERENCE = "full"


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
        importlib.import_module(f"omnikv.methods.{mod}")
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
    """A configured method by registry name (options are the method's dataclass fields, plus
    static= / compile= / compile_backend= / compile_mode= for methods with a static-shape step)."""
    if isinstance(name, Method):
        return name
    cls = method_class(name)
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
        method = cls.from_options(budget=budget, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from None
    method.compile = bool(compile_) or bool(backend) or bool(mode)
    method.static = bool(static) or method.compile
    method.compile_backend, method.compile_mode = backend, mode
    return method


def make_decoder(method: Method, model, cache):
    """The `omnikv.hf.static.StaticDecoder` that drives `cache` when `method` is static or
    compiled; None otherwise (the model's own forward is used)."""
    if not method.static:
        return None
    from omnikv.hf.static import StaticDecoder

    return StaticDecoder(model, cache, compile=method.compile, backend=method.compile_backend,
                         mode=method.compile_mode, method=method.name)


__all__ = ["REFERENCE", "Method", "available_methods", "get_method", "make_decoder", "method_class", "methods_taking", "register"]
