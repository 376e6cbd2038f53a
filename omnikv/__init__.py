"""OmniKV: drop-free dynamic context selection for long-context decoding on transformers.

The names below are what the README tells users to import (`omnikv.load_model`,
`omnikv.generate`, `omnikv.OmniKVCache`, ...). They load lazily (PEP 562 `__getattr__`), so
`import omnikv.algorithm.selection` or `import omnikv.config` pulls in neither transformers nor the model
code: the tensor core stays usable from environments that bring their own engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from omnikv.errors import ConfigError, InputError, ModelLoadError, OmniKVError, ResourceError, UnsupportedModelError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "OmniKVCache": "omnikv.algorithm.cache",
    "OmniKVConfig": "omnikv.config",
    "Budget": "omnikv.budget",
    "preset_for_model": "omnikv.algorithm.presets",
    "resolve_preset": "omnikv.algorithm.presets",
    "load_model": "omnikv.models",
    "generate": "omnikv.decoding.generation",
    "teacher_forced_logits": "omnikv.decoding.generation",
    "Session": "omnikv.decoding.generation",
    "SamplingParams": "omnikv.decoding.generation",
    "GenerationResult": "omnikv.decoding.generation",
    "PrefixCache": "omnikv.decoding.prefix_cache",
    "get_method": "omnikv.methods",
    "cache_kwargs": "omnikv.hf.compat",
    "available_methods": "omnikv.methods",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from omnikv.budget import Budget
    from omnikv.algorithm.cache import OmniKVCache
    from omnikv.config import OmniKVConfig
    from omnikv.decoding.generation import GenerationResult, SamplingParams, Session, generate, teacher_forced_logits
    from omnikv.decoding.prefix_cache import PrefixCache
    from omnikv.hf.compat import cache_kwargs
    from omnikv.methods import available_methods, get_method
    from omnikv.models import load_model
    from omnikv.algorithm.presets import preset_for_model, resolve_preset


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omnikv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    *_LAZY,
    "OmniKVError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
    "ResourceError",
    "UnsupportedModelError",
]
