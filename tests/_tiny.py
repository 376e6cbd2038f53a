"""Tiny random models shared by the test modules, built once per process."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _cached(family: str, overrides: tuple):
    from omnikv.models.tiny import tiny_model

    return tiny_model(family, **dict(overrides))


def cached_tiny_model(family: str = "llama", **overrides):
    """A tiny random model for (family, overrides), built on first use and shared afterwards."""
    return _cached(family, tuple(sorted(overrides.items())))
