"""The layers of a managed cache: each stores its KV *and* decides how attention runs.

`ManagedLayer` is the base (it implements transformers' cache-layer interface and `attend`, which
the registered "omnikv" attention function calls); `DenseLayer` is full attention over a
preallocated buffer; `SlidingLayer` keeps hybrid models' sliding-window layers exact. OmniKV's two
roles, `FilterLayer` and `SparseLayer`, build on these in omnikv/algorithm/layers.py. A layer may
hand attention a subset of its rows; it then reports their logical positions so the causal/padding
mask can be gathered to match (omnikv/hf/masks.py).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from omnikv.hf.attention import sdpa_attention
from omnikv.hf.buffers import KVBuffer, kv_bytes
from omnikv.hf.compat import CacheLayerBase, DynamicSlidingWindowLayer, mask_query_length, sliding_window
from omnikv.hf.meter import DeviceMeter
from omnikv.hf.masks import positions_mask
from omnikv.hf.static import mark_static, zero_tail


class ManagedLayer(CacheLayerBase):
    """Base layer: subclasses implement `update` and may override `attend`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_static = False  # has a static-shape decode step (omnikv/hf/static.py)
    static = None  # the cache's StaticState when built with static=True (omnikv/hf/static.py)

    def __init__(self) -> None:
        super().__init__()
        self.seq_length = 0  # logical length: every token this layer has seen
        self.last_attended = 0  # KV rows used by the last attention call (for stats)

    # -- stored rows: transformers reads `.keys` / `.values` in a few helpers (batch size, device)
    def kv_view(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows this layer keeps on the device, (B, H, n, D) each; None before any."""
        return None

    @property
    def keys(self) -> torch.Tensor | None:
        view = self.kv_view()
        return None if view is None else view[0]

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:
        view = self.kv_view()
        return None if view is None else view[1]

    @values.setter
    def values(self, value) -> None:
        pass

    # -- forks of a shared prefill (omnikv/decoding/fork.py) ---------------------------------------
    # True for a layer that scores every prompt row with every prompt query (H2O): a cache seeded
    # with a prefix prefilled elsewhere hands it the prefix's queries (`ManagedCache.seed_prefix`).
    needs_prefix_queries = False

    def prefill_window(self) -> int:
        """Prompt tokens at the end of a prefill whose queries this layer reads to decide what it
        decides when decoding starts (an observation window); a fork prefills them itself."""
        return 0

    # -- static-shape decode (omnikv/hf/static.py: StaticState runs these, outside compiled code)
    @property
    def static_step(self) -> bool:
        """This forward is a step of a static run (its shapes are fixed for the whole run)."""
        return self.static is not None and self.static.active

    def begin_static(self, state) -> None:
        """The first static step after a prompt: take the run's fixed shapes (`state.capacity`)."""

    def advance_static(self) -> None:
        """Before each static step: count the token it writes."""
        self.seq_length += 1

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # Masks always span the logical sequence; layers that return a subset of rows gather
        # the matching mask columns in `attend`.
        return self.seq_length + mask_query_length(query_length), 0

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
        """Device bytes of the KV rows in use."""
        return 0

    def allocated_device_bytes(self) -> int:
        """Device bytes allocated for KV (capacity, not rows in use)."""
        return self.device_bytes()

    def host_bytes(self) -> int:
        return 0

    def use_meter(self, meter: DeviceMeter) -> None:
        """Count this layer's device KV buffers in the cache's meter (omnikv/hf/meter.py)."""

    def reset(self) -> None:  # pragma: no cover - generate() does not call it for user caches
        raise NotImplementedError("build a new cache instead of resetting one")


class DenseLayer(ManagedLayer):
    """Full attention over every token, in a preallocated growable buffer."""

    supports_static = True

    def __init__(self, headroom: int = 256) -> None:
        super().__init__()
        self.buffer = KVBuffer(headroom)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static_step:
            return self._update_static(key_states, value_states)
        self.seq_length += key_states.shape[-2]
        return self.buffer.append(key_states, value_states)

    def kv_view(self):
        return None if self.buffer.keys is None else self.buffer.view()

    def use_meter(self, meter: DeviceMeter) -> None:
        self.buffer.meter = meter

    # -- static-shape decode (omnikv/hf/static.py) ----------------------------------------------
    def begin_static(self, state) -> None:
        """The buffer at full capacity, its unwritten rows zeroed, its address fixed."""
        buf = self.buffer
        if buf.keys is None:
            return
        buf.reserve(state.capacity, buf.keys)
        zero_tail(buf.keys, buf.length)
        zero_tail(buf.values, buf.length)
        mark_static(buf.keys.device, buf.keys, buf.values)
        state.ensure_pos(buf.keys.device)

    def advance_static(self) -> None:
        super().advance_static()
        self.buffer.length += 1

    def _update_static(self, key_states, value_states):
        """Static decode step (B, H, 1, D): write at the device position `static.pos` (the cache
        advanced `seq_length` already); return the whole reserved buffer, (B, H, capacity, D),
        whose unwritten rows the causal mask hides."""
        st, buf = self.static, self.buffer
        buf.keys.index_copy_(2, st.index(), key_states)
        buf.values.index_copy_(2, st.index(), value_states)
        return buf.keys[:, :, : st.capacity], buf.values[:, :, : st.capacity]

    def device_bytes(self) -> int:
        return self.buffer.used_bytes()

    def allocated_device_bytes(self) -> int:
        return self.buffer.allocated_bytes()


class SlidingLayer(DynamicSlidingWindowLayer):
    """Hybrid models' sliding-window layers: transformers' own exact window cache."""

    supports_static = False  # the window cache changes shape
    meter: DeviceMeter | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' window update; the tensors it makes (the window kept, and the window +
        chunk a prompt chunk attends to) are counted in the cache's meter while they live."""
        out = super().update(key_states, value_states, *args, **kwargs)
        if self.meter is not None:
            for t in (*out, self.keys, self.values):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        """Count the storage `t` views (once: a kept window is a view of the returned states)."""
        base = t if t._base is None else t._base
        if id(base) in self._counted:
            return
        self._counted.add(id(base))
        self.meter.track(base)
        weakref.finalize(base, self._counted.discard, id(base))

    def use_meter(self, meter: DeviceMeter) -> None:
        self.meter = meter
        self._counted: set[int] = set()  # ids of the bases counted and still alive

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        self.last_attended = key.shape[-2]
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    def device_bytes(self) -> int:
        return kv_bytes(self.keys) if self.is_initialized else 0

    def allocated_device_bytes(self) -> int:
        return self.device_bytes()

    def host_bytes(self) -> int:
        return 0


def make_sliding_layer(config) -> SlidingLayer:
    return SlidingLayer(sliding_window=sliding_window(config))
