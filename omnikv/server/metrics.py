"""Prometheus metrics of one server instance (its own registry, so several apps can coexist in tests).

KV bytes are those reported by the cache of the most recently finished request (`cache.stats()`):
the cache lives only inside a generation, so this is the last observed footprint, not a live value.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from omnikv.server.protocol import EngineResult

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, queue_length: Callable[[], int], running: Callable[[], int], prefix_cache: Any = None) -> None:
        """prefix_cache: the engine's `omnikv.decoding.prefix_cache.PrefixCache`, if it has one."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "omnikv_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "omnikv_request_latency_seconds",
            "Time from receiving a request to the end of its response (streams included).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "omnikv_queue_wait_seconds", "Time a request waited before the engine started it.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("omnikv_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("omnikv_completion_tokens", "Completion tokens generated.", registry=r)
        self.cached_tokens = Counter("omnikv_prompt_tokens_cached", "Prompt tokens whose prefill was reused (prefix cache).", registry=r)
        if prefix_cache is not None:
            r.register(_PrefixCacheCollector(prefix_cache))
        Gauge("omnikv_queue_length", "Requests waiting for the engine.", registry=r).set_function(queue_length)
        Gauge("omnikv_requests_running", "Requests the engine is generating now.", registry=r).set_function(running)
        self.kv_device = Gauge("omnikv_kv_device_bytes", "KV-cache bytes on the device (last finished request).", registry=r)
        self.kv_host = Gauge("omnikv_kv_host_bytes", "KV-cache bytes in host memory (last finished request).", registry=r)

    def observe_result(self, result: EngineResult) -> None:
        """Called on the worker thread when a generation finishes (prometheus_client is thread-safe)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        if "device_kv_bytes" in result.stats:
            self.kv_device.set(float(result.stats["device_kv_bytes"]))
        if "host_kv_bytes" in result.stats:
            self.kv_host.set(float(result.stats["host_kv_bytes"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector(Collector):
    """The prefix store's counters and size, read when /metrics is scraped."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        st = self.store.stats()
        for name, value, doc in (
            ("hits", st.hits, "Requests that reused a stored prompt prefix."),
            ("misses", st.misses, "Requests that found no stored prefix to reuse."),
            ("evictions", st.evictions, "Stored prefixes dropped to stay within the byte bound."),
        ):
            yield CounterMetricFamily(f"omnikv_prefix_cache_{name}", doc, value=value)
        held = GaugeMetricFamily("omnikv_prefix_cache_bytes", "Bytes the prefix store holds, by memory.", labels=["memory"])
        held.add_metric(["host"], st.host_bytes)
        held.add_metric(["device"], st.device_bytes)
        yield held
        yield GaugeMetricFamily("omnikv_prefix_cache_capacity_bytes", "The prefix store's byte bound (--prefix-cache-bytes).", value=st.max_bytes)
        yield GaugeMetricFamily("omnikv_prefix_cache_entries", "Prompt prefixes the store holds.", value=st.entries)
