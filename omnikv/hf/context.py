"""One-shot hand-off from `Cache.update` to the attention function.

transformers calls `cache.update(k, v, layer_idx)` and then, in the same attention module, the
registered attention function, which does not receive the cache. `update` leaves (cache, layer)
here; the attention function takes it (and clears it), so a forward pass without one of our caches
never sees stale state. Thread-local: each server worker thread has its own slot.
"""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


def put(cache: Any, layer_idx: int) -> None:
    _local.slot = (cache, layer_idx)


def take(layer_idx: int) -> Any | None:
    """The cache that just updated `layer_idx`, or None (consumed on read)."""
    slot = getattr(_local, "slot", None)
    if slot is None or slot[1] != layer_idx:
        return None
    _local.slot = None
    return slot[0]
