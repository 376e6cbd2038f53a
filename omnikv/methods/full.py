"""Exact baselines: transformers' own caches and our preallocated full-attention cache."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

import torch

from omnikv.hf.cache import ManagedCache, check_supported
from omnikv.hf.compat import Cache, is_cuda, text_config
from omnikv.hf.layers import DenseLayer, make_sliding_layer
from omnikv.methods import register
from omnikv.methods.base import Method
from omnikv.methods.memory import KVContext, KVPlan
from transformers import DynamicCache


def stock_cache_stats(cache: Cache, method: str, offloaded: bool = False) -> dict[str, Any]:
    """stats() for transformers' own caches: bytes of the stored KV (device or host)."""
    total = 0
    attended = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or not getattr(layer, "is_initialized", False):
            attended.append(0)
            continue
        total += 2 * keys.numel() * keys.element_size()
        attended.append(int(keys.shape[-2]))
    host = total if offloaded else 0
    return {
        "method": method,
        "seq_length": cache.get_seq_length(),
        "device_kv_bytes": int(total - host),
        "host_kv_bytes": int(host),
        "h2d_bytes_per_step": int(host),  # whole layers come back every step
        "attended_tokens_per_layer": attended,
    }


class StockDynamicCache(DynamicCache):
    """transformers' DynamicCache with our `stats()`; behaviour unchanged."""

    method_name = "full"

    def stats(self) -> dict[str, Any]:
        return stock_cache_stats(self, self.method_name, offloaded=bool(self.offloading))

    # forks of a shared prefill (omnikv/decoding/fork.py): `update` stores, attention is SDPA
    def fork_needs(self) -> tuple[int, bool]:
        return 1, False

    def seed_prefix(self, kv: Iterable[tuple[torch.Tensor, torch.Tensor]], queries: Any = None) -> None:
        for i, (k, v) in enumerate(kv):
            self.update(k, v, i)


@register("full")
@dataclass(eq=False)
class FullAttention(Method):
    """Plain transformers full attention with the stock DynamicCache: the reference."""

    takes_budget = False

    def make_cache(self, model):
        return StockDynamicCache(config=model.config)

    def describe(self):
        return {"method": self.name, "budget": None, "lossy": False, "note": "transformers DynamicCache"}


@register("full_offload")
@dataclass(eq=False)
class FullOffload(Method):
    """transformers' offloaded DynamicCache: exact, moves whole layers host<->device each step.

    On a CPU-only machine there is nothing to offload to; the cache is then the plain one.
    """

    takes_budget = False

    def make_cache(self, model):
        device = next(model.parameters()).device
        offload = is_cuda(device)
        cache = StockDynamicCache(config=model.config, offloading=offload)
        cache.method_name = self.name
        return cache

    def describe(self):
        return {"method": self.name, "budget": None, "lossy": False, "note": "transformers offloading=True (CUDA only)"}

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        if not ctx.on_accelerator:
            return super().kv_plan(ctx)
        # The whole KV lives in host memory; the layer in use and the next one are on the device.
        biggest = max(ctx.full_rows) * ctx.row_bytes
        return KVPlan(2 * biggest, ctx.full_kv_bytes, ["whole layers move host<->device every step"], offload=True)


class PreallocatedCache(ManagedCache):
    """Full attention over preallocated, growable buffers (no per-step concatenation)."""

    method_name = "full_prealloc"

    def __init__(self, model: torch.nn.Module, static: bool = False) -> None:
        """static: static-shape decode steps (omnikv/hf/static.py; needs `reserve` before the prompt)."""
        types = check_supported(model, "full_prealloc")
        cfg = text_config(model)
        layers = [make_sliding_layer(cfg) if t == "sliding_attention" else DenseLayer() for t in types]
        super().__init__(model, layers, static=static)


@register("full_prealloc")
@dataclass(eq=False)
class FullPrealloc(Method):
    """Exact full attention, preallocated storage: the honest speed baseline."""

    takes_budget = False
    supports_static = True

    def make_cache(self, model):
        return PreallocatedCache(model, static=self.static)

    def describe(self):
        d = {"method": self.name, "budget": None, "lossy": False}
        if self.static:
            d.update(static=True, compile=self.compile)
        return d
