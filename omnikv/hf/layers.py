"""The layers of a managed cache: each stores its KV *and* decides how attention runs.

`ManagedLayer` is the base (it implements transformers' cache-layer interface and `attend`, which
the registered "omnikv" attention function calls); `DenseLayer` is full attention over a
preallocated buffer; `SlidingLayer` keeps hybrid models' sliding-window layers exact. OmniKV's two
roles, `FilterLayer` and `SparseLayer`, build on these in omnikv/algorithm/layers.py. A layer may
hand attention a subset of its rows; it then reports their logical positions so the causal/padding
mask can be gathered to match (omnikv/hf/masks.py).
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv.hf.attention import sdpa_attention
from omnikv.hf.buffers import KVBuffer
from omnikv.hf.compat import CacheLayerMixin, DynamicSlidingWindowLayer, sliding_window
from omnikv.hf.masks import positions_mask


class ManagedLayer(CacheLayerMixin):
    """Base layer: subclasses implement `update` and may override `attend`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    static = None  # the cache's StaticState when built with static=True (omnikv/hf/static.py)

    def __init__(self) -> None:
        super().__init__()
        self.seq_length = 0  # logical length: every token this layer has seen
        self.last_attended = 0  # KV rows used by the last attention call (for stats)

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks always span the logical sequence; layers that return a subset of rows gather
        # the matching mask columns in `attend`.
        return self.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # -- ours ------------------------------------------------------------------------------
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """SDPA over the rows `update` returned.

        Args:
            positions: (B, G, n) logical positions of the n KV rows, when they are not simply
                0..n-1 (subset or reordered); None = rows are the logical sequence.
        """
        if positions is not None:
            attention_mask = positions_mask(attention_mask, positions, query.shape[1])
        self.last_attended = key.shape[-2]
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    def device_bytes(self) -> int:
        return 0

    def host_bytes(self) -> int:
        return 0

    def reset(self) -> None:  # pragma: no cover - generate() does not call it for user caches
        raise NotImplementedError("build a new cache instead of resetting one")


class DenseLayer(ManagedLayer):
    """Full attention over every token, in a preallocated growable buffer."""

    def __init__(self, headroom: int = 256) -> None:
        super().__init__()
        self.buffer = KVBuffer(headroom)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static is not None and self.static.active:
            return self._update_static(key_states, value_states)
        self.seq_length += key_states.shape[-2]
        return self.buffer.append(key_states, value_states)

    def _update_static(self, key_states, value_states):
        """Static decode step (B, H, 1, D): write at the device position `static.pos` (the cache
        advanced `seq_length` already); return the whole reserved buffer, (B, H, capacity, D),
        whose unwritten rows the causal mask hides."""
        st, buf = self.static, self.buffer
        buf.keys.index_copy_(2, st.index(), key_states)
        buf.values.index_copy_(2, st.index(), value_states)
        return buf.keys[:, :, : st.capacity], buf.values[:, :, : st.capacity]

    @property
    def keys(self):  # transformers reads `.keys` in a few helpers (e.g. batch size)
        return None if self.buffer.keys is None else self.buffer.view()[0]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self):
        return None if self.buffer.values is None else self.buffer.view()[1]

    @values.setter
    def values(self, value):
        pass

    def device_bytes(self) -> int:
        return self.buffer.used_bytes()


class SlidingLayer(DynamicSlidingWindowLayer):
    """Hybrid models' sliding-window layers: transformers' own exact window cache."""

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        self.last_attended = key.shape[-2]
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    def device_bytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def host_bytes(self) -> int:
        return 0



def make_sliding_layer(config) -> SlidingLayer:
    return SlidingLayer(sliding_window=sliding_window(config))
