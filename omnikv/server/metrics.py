"""Prometheus metrics of one server instance (its own registry, so several apps can coexist in tests).

KV bytes are those reported by the cache of the most recently finished request (`cache.stats()`):
the cache lives only inside a generation, so this is the last observed footprint, not a live value.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omnikv.server.protocol import EngineResult

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, queue_length: Callable[[], int], running: Callable[[], int]) -> None:
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
        Gauge("omnikv_queue_length", "Requests waiting for the engine.", registry=r).set_function(queue_length)
        Gauge("omnikv_requests_running", "Requests the engine is generating now.", registry=r).set_function(running)
        self.kv_device = Gauge("omnikv_kv_device_bytes", "KV-cache bytes on the device (last finished request).", registry=r)
        self.kv_host = Gauge("omnikv_kv_host_bytes", "KV-cache bytes in host memory (last finished request).", registry=r)

    def observe_result(self, result: EngineResult) -> None:
        """Called on the worker thread when a generation finishes (prometheus_client is thread-safe)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        if "device_kv_bytes" in result.stats:
            self.kv_device.set(float(result.stats["device_kv_bytes"]))
        if "host_kv_bytes" in result.stats:
            self.kv_host.set(float(result.stats["host_kv_bytes"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
