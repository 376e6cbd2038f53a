"""Preallocated, geometrically growing KV storage.

The stock DynamicCache concatenates the whole layer on every decode step (O(N) copy per layer per
step: ~92 ms per step at 32K tokens for SmolLM2 on 2 CPU cores). These buffers write the new rows in
place and hand out views, so a decode step copies only the new token.
"""

from __future__ import annotations

import math

import torch

from omnikv.errors import InputError
from omnikv.hf.meter import DeviceMeter

GROWTH = 1.5


def grown_capacity(needed: int, current: int, headroom: int) -> int:
    """The one growth rule of every growable buffer: x1.5, and at least `headroom` rows spare."""
    return max(needed + headroom, math.ceil(current * GROWTH), needed)


class KVBuffer:
    """Keys and values of one layer: (B, H, capacity, D) each, the first `length` rows in use."""

    def __init__(self, headroom: int = 256) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.headroom = headroom
        self.target = 0  # rows announced by `ManagedCache.reserve`: allocated exactly, at once
        self.meter: DeviceMeter | None = None  # the cache's device meter (omnikv/hf/meter.py)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reserve(self, needed: int, like: torch.Tensor) -> None:
        """Make room for `needed` rows in total (copies the used rows once when it grows)."""
        if self.keys is not None and needed <= self.capacity:
            return
        cap = self.target if needed <= self.target else grown_capacity(needed, self.capacity, self.headroom)
        b, h, _, d = like.shape
        keys = like.new_empty((b, h, cap, d))
        values = like.new_empty((b, h, cap, d))
        if self.meter is not None:
            self.meter.track(keys)
            self.meter.track(values)
        if self.keys is not None and self.length:
            keys[:, :, : self.length].copy_(self.keys[:, :, : self.length])
            values[:, :, : self.length].copy_(self.values[:, :, : self.length])
        self.keys, self.values = keys, values

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, n, D) rows; return views of all rows in use, (B, H, length, D)."""
        n = key.shape[-2]
        if self.keys is not None and (key.shape[0] != self.keys.shape[0] or key.shape[1] != self.keys.shape[1]):
            raise InputError(
                f"KV of shape {tuple(key.shape)} does not fit a cache holding "
                f"{tuple(self.keys.shape)}: a cache serves one model and one batch; build a new one"
            )
        self.reserve(self.length + n, key)
        self.keys[:, :, self.length : self.length + n].copy_(key)
        self.values[:, :, self.length : self.length + n].copy_(value)
        self.length += n
        return self.view()

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def used_bytes(self) -> int:
        return kv_bytes(self.keys, self.length)

    def allocated_bytes(self) -> int:
        return kv_bytes(self.keys)


def kv_bytes(keys: torch.Tensor | None, rows: int | None = None) -> int:
    """Bytes of K and V for `rows` rows (every row when None) of a layer whose keys are `keys`
    (B, H, capacity, D); 0 before it holds any."""
    if keys is None:
        return 0
    n = keys.shape[-2] if rows is None else rows
    return 2 * n * keys[:, :, :1].numel() * keys.element_size()
