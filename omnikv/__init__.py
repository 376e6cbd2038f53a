"""OmniKV: drop-free dynamic context selection for long-context decoding on transformers.

The top-level names are resolved lazily (PEP 562): `import omnikv.selection` or `omnikv.config`
must not import transformers, so that the selection code can be shared with environments that pin
another transformers version (the vLLM plugin in integrations/vllm imports it next to vLLM's own).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "OmniKVCache": "omnikv.cache",
    "OmniKVConfig": "omnikv.config",
    "preset_for_model": "omnikv.presets",
    "OmniKVError": "omnikv.errors",
    "ConfigError": "omnikv.errors",
    "InputError": "omnikv.errors",
    "ModelLoadError": "omnikv.errors",
    "ResourceError": "omnikv.errors",
    "UnsupportedModelError": "omnikv.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omnikv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
