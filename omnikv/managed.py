"""A transformers `Cache` whose layers also decide how attention runs.

`ManagedCache` is the common base of OmniKV and of every baseline that needs more than the stock
caches: each layer object stores its KV *and* implements `attend(...)`, which the registered
"omnikv" attention function calls. A layer may hand attention a subset of its rows; it then reports
their logical positions so the causal/padding mask can be gathered to match.
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv import _context
from omnikv._compat import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, layer_types, sdpa_attention_forward, sliding_window
from omnikv.attention import use_omnikv_attention
from omnikv.errors import InputError, UnsupportedModelError
from omnikv.selection import positions_mask
from omnikv.storage import KVBuffer


class ManagedLayer(CacheLayerMixin):
    """Base layer: subclasses implement `update` and may override `attend`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

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
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

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
        self.seq_length += key_states.shape[-2]
        return self.buffer.append(key_states, value_states)

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
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def device_bytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def host_bytes(self) -> int:
        return 0


class ManagedCache(Cache):
    """Container of managed layers; hands each attention call to its layer."""

    method_name = "managed"

    def __init__(self, model: torch.nn.Module, layers: list[CacheLayerMixin]) -> None:
        super().__init__(layers=layers)
        self.model_fingerprint = model_fingerprint(model)
        cfg = text_config(model)
        self._kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        use_omnikv_attention(model)

    # transformers calls this once per layer per forward, right before attention.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise UnsupportedModelError(
                f"this cache has {len(self.layers)} layers but layer {layer_idx} asked for one: it "
                f"was built for another model ({self.model_fingerprint}); build one per model"
            )
        if layer_idx == 0:
            self._check_forward(key_states, kwargs)
        _context.put(self, layer_idx)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _check_forward(self, key_states: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Once per forward (layer 0): refuse another model's KV, and input that does not continue
        the cached sequence (e.g. `model.generate` called twice with the same prompt on one cache),
        which would otherwise silently decode garbage. key_states (B, Hk, q, D)."""
        if key_states.shape[1] != self._kv_heads:
            raise UnsupportedModelError(
                f"this cache was built for {self.model_fingerprint} but gets KV with "
                f"{key_states.shape[1]} heads: a cache serves the model it was built for; build one per model"
            )
        inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
        pos = inner.get("position_ids")
        q = key_states.shape[-2]
        # Decode steps on an accelerator skip the check: reading the positions would sync every step.
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] != q or (q == 1 and pos.device.type != "cpu"):
            return
        seen = self.layers[0].get_seq_length()
        last = int(pos[:, -1].max())  # the unpadded row of a left-padded batch
        if last != seen + q - 1:
            raise InputError(
                f"this cache already holds {seen} tokens but the new input continues at position "
                f"{last - q + 1}: a cache continues one sequence. Pass the whole sequence so far "
                f"(the previous output plus new tokens) to continue it, or build a new cache for a new prompt"
            )

    def attend(self, layer_idx: int, module, query, key, value, attention_mask, **kwargs):
        return self.layers[layer_idx].attend(module, query, key, value, attention_mask, **kwargs)

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        device = sum(layer.device_bytes() for layer in self.layers)
        host = sum(layer.host_bytes() for layer in self.layers)
        return {
            "method": self.method_name,
            "seq_length": self.get_seq_length(),
            "device_kv_bytes": int(device),
            "host_kv_bytes": int(host),
            "h2d_bytes_per_step": int(self.h2d_bytes_last_step()),
            "attended_tokens_per_layer": [int(getattr(l, "last_attended", 0)) for l in self.layers],
        }

    def h2d_bytes_last_step(self) -> int:
        return 0

    def reserve(self, extra_tokens: int) -> None:
        """Hint: about `extra_tokens` more tokens will come (sizes the buffers' headroom)."""
        for layer in self.layers:
            buf = getattr(layer, "buffer", None)
            if isinstance(buf, KVBuffer):
                buf.headroom = max(buf.headroom, extra_tokens)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedModelError(
            "beam search / num_return_sequences > 1 is not supported with this cache; "
            "use greedy or sampling with one sequence per prompt"
        )

    def reorder_cache(self, beam_idx) -> None:
        self.batch_repeat_interleave(0)


def model_fingerprint(model: torch.nn.Module) -> str:
    cfg = model.config.get_text_config(decoder=True)
    return (
        f"{cfg.model_type}/{cfg.num_hidden_layers}L/{cfg.num_key_value_heads}kv/"
        f"{getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads}d"
    )


def make_sliding_layer(config) -> SlidingLayer:
    return SlidingLayer(sliding_window=sliding_window(config))


def text_config(model: torch.nn.Module):
    return model.config.get_text_config(decoder=True)


def check_supported(model: torch.nn.Module, method: str) -> list[str]:
    """Layer types of `model`, or a clear error when it has no full-attention layer we can manage."""
    types = layer_types(model.config)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(
            f"{method} supports decoder models with full and sliding-window attention layers; "
            f"{model.config.model_type} has layer types {unknown} (linear/chunked attention or "
            f"KV sharing). Use --method full for this model."
        )
    if getattr(text_config(model), "kv_sharing_modes", None):
        raise UnsupportedModelError(f"{model.config.model_type} shares KV between layers; use --method full")
    return types
