"""Error types shared by the library, the CLI and the server.

`OmniKVError` subclasses carry messages written for users: they say what is wrong *and* what to do.
The CLI prints them as one line (no traceback); the server turns them into OpenAI-style 4xx errors.
"""

from __future__ import annotations


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
