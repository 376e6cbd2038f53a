"""OmniKV: drop-free dynamic context selection for long-context decoding on transformers."""

from omnikv.cache import OmniKVCache
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError, InputError, ModelLoadError, OmniKVError, ResourceError, UnsupportedModelError
from omnikv.presets import preset_for_model

__version__ = "0.1.0"

__all__ = [
    "OmniKVCache",
    "OmniKVConfig",
    "preset_for_model",
    "OmniKVError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
    "ResourceError",
    "UnsupportedModelError",
]
