"""Error types shared by the library, the CLI and the server.

`OmniKVError` subclasses carry messages written for users: they say what is wrong *and* what to do.
The CLI prints them as one line (no traceback); the server turns them into OpenAI-style 4xx errors.
"""

from __future__ import annotations

from typing import Any


class OmniKVError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(OmniKVError, ValueError):
    """A configuration value is invalid (names the field and the fix)."""


class UnsupportedModelError(OmniKVError, ValueError):
    """The model's architecture cannot be run by the requested method."""


class InputError(OmniKVError, ValueError):
    """A prompt, file or request is unusable (empty, too long, undecodable ...)."""


class ModelLoadError(OmniKVError, RuntimeError):
    """A model could not be found, converted or loaded."""


class ResourceError(OmniKVError, RuntimeError):
    """The request does not fit in the available device or host memory."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` if it is an int >= `minimum` (a bool is not), else a ConfigError naming the option:
    the one integer check of configs, method options and sampling settings."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value
