"""Memory planning: how many bytes a request needs on the device and in host memory.

Each method plans its own KV (`Method.kv_plan(KVContext) -> KVPlan`); this module adds weights
and activations and compares with what is free. Used before prefill (`Session.feed` refuses a request that cannot fit, before minutes of work are
spent) and by `omnikv plan` to size hardware. Estimates, not measurements: KV bytes are exact for
the layouts this library allocates; activations are an upper-bound rule of thumb.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from omnikv.hf.compat import layer_types, sliding_window, text_shape
from omnikv.errors import ResourceError

GiB = 1024**3


@dataclass
class MemoryPlan:
    method: str
    context: int
    device: str
    weights_bytes: int
    device_kv_bytes: int
    host_kv_bytes: int
    activation_bytes: int
    device_total_bytes: int
    host_total_bytes: int
    device_available_bytes: int | None
    host_available_bytes: int | None
    full_device_kv_bytes: int  # what full attention would keep on the device, for comparison
    notes: list[str] = field(default_factory=list)
    device_peak_kv_bytes: int = 0  # device KV at its peak (prefill or decode), >= device_kv_bytes
    offload: bool | None = None  # the method keeps KV in host memory (None: it has no such switch)
    decode_device_bytes: int = 0  # weights + KV + activations of a decode step (the steady state)
    prefill_peak_device_bytes: int = 0  # weights + KV + activations at the prefill's peak

    @property
    def fits(self) -> bool:
        dev_ok = self.device_available_bytes is None or self.device_total_bytes <= self.device_available_bytes
        host_ok = self.host_available_bytes is None or self.host_total_bytes <= self.host_available_bytes
        return dev_ok and host_ok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        d["device_kv_share_of_full"] = (
            round(self.device_kv_bytes / self.full_device_kv_bytes, 4) if self.full_device_kv_bytes else None
        )
        return d


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field (e.g. "MemAvailable", "MemTotal") in bytes; None where unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available_bytes() -> int | None:
    return meminfo_bytes("MemAvailable")


def device_available_bytes(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


@dataclass(frozen=True)
class KVContext:
    """What a method's `kv_plan` sees: the model's shape and one request's sizes (batch 1)."""

    config: Any  # the model's (transformers) config
    context: int  # prompt tokens
    max_new_tokens: int
    dtype_bytes: int
    on_accelerator: bool
    layer_types: tuple[str, ...]
    kv_heads: int
    head_dim: int
    sliding_window: int
    prefill_chunk: int | None = None  # prompt tokens per forward (None: the whole prompt at once)

    @classmethod
    def of(cls, config, context: int, max_new_tokens: int, dtype_bytes: int, on_accelerator: bool,
           prefill_chunk: int | None = None) -> KVContext:
        s = text_shape(config)
        return cls(config, context, max_new_tokens, dtype_bytes, on_accelerator, tuple(layer_types(config)),
                   s.kv_heads, s.head_dim, sliding_window(config) or 0, prefill_chunk)

    @property
    def chunk(self) -> int:
        """Tokens per prompt forward (at least 1, at most the prompt)."""
        return max(1, min(self.prefill_chunk or self.context, self.context))

    @property
    def total_tokens(self) -> int:
        return self.context + self.max_new_tokens

    @property
    def row_bytes(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def full_rows(self) -> list[int]:
        """Rows each layer holds under full attention (a sliding layer: its window)."""
        total = self.total_tokens
        return [min(total, self.sliding_window) if t == "sliding_attention" else total for t in self.layer_types]

    @property
    def full_kv_bytes(self) -> int:
        return self.row_bytes * sum(self.full_rows)

    @property
    def sliding_prefill_extra_bytes(self) -> int:
        """What every method's sliding layers hold beyond their window while a prompt chunk runs:
        transformers' window cache concatenates the kept window (window - 1 rows) and the chunk
        before it drops the oldest rows, so a hybrid model's prefill peak has window - 1 + chunk
        rows per sliding layer (counted by the device meter, omnikv/hf/layers.py)."""
        n = sum(t == "sliding_attention" for t in self.layer_types)
        if not n or not self.sliding_window:
            return 0
        during = min(self.context - self.chunk, self.sliding_window - 1) + self.chunk
        return n * self.row_bytes * max(0, during - min(self.total_tokens, self.sliding_window))


@dataclass
class KVPlan:
    """A method's KV bytes for one request: on the device, in host memory, and why."""

    device_kv_bytes: int
    host_kv_bytes: int
    notes: list[str] = field(default_factory=list)
    # Device KV at the prefill's peak when that is not the decode steady state (OmniKV with
    # offload streams prefixes and packs chunks while the prompt runs); None = the same.
    device_peak_kv_bytes: int | None = None
    offload: bool | None = None  # the method's KV lives in host memory (None: no such switch)


def estimate_weights_bytes(config, dtype_bytes: int) -> int:
    s = text_shape(config)
    per_layer = 4 * s.hidden * s.heads * s.head_dim + 3 * s.hidden * s.intermediate
    embed = s.vocab * s.hidden * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return int((s.layers * per_layer + embed) * dtype_bytes)


def plan_memory(
    config,
    context: int,
    method="omnikv",
    *,
    device: str = "cpu",
    dtype_bytes: int = 4,
    max_new_tokens: int = 256,
    prefill_chunk_size: int | None = None,
    budget: int | float | None = None,
    weights_bytes: int | None = None,
) -> MemoryPlan:
    """Estimate the memory of one request of `context` prompt tokens (batch 1).

    `method` is a configured `Method` or a registry name (then built with `budget`); the KV part
    is the method's own `kv_plan`."""
    from omnikv.methods import get_method

    if isinstance(method, str):
        method = get_method(method, budget=budget)
    s = text_shape(config)
    on_accel = device.startswith("cuda")
    ctx = KVContext.of(config, context, max_new_tokens, dtype_bytes, on_accel, prefill_chunk_size)
    kv = method.kv_plan(ctx)
    prefill_act = activation_bytes(config, ctx.chunk, dtype_bytes)
    decode_act = activation_bytes(config, 1, dtype_bytes)
    weights = weights_bytes if weights_bytes is not None else estimate_weights_bytes(config, dtype_bytes)
    dev_kv, host_kv = kv.device_kv_bytes, kv.host_kv_bytes
    prefill_kv = (dev_kv if kv.device_peak_kv_bytes is None else kv.device_peak_kv_bytes) + ctx.sliding_prefill_extra_bytes
    decode_total = weights + dev_kv + decode_act
    prefill_total = weights + prefill_kv + prefill_act
    if on_accel:
        device_total = max(decode_total, prefill_total)
        host_total = host_kv
    else:  # everything is host memory on a CPU run
        device_total = 0
        host_total = weights + dev_kv + host_kv + prefill_act
    return MemoryPlan(
        method=method.name,
        context=context,
        device=device,
        weights_bytes=int(weights),
        device_kv_bytes=int(dev_kv),
        host_kv_bytes=int(host_kv),
        activation_bytes=prefill_act,
        device_total_bytes=int(device_total),
        host_total_bytes=int(host_total),
        device_available_bytes=device_available_bytes(device) if on_accel else None,
        host_available_bytes=host_available_bytes(),
        full_device_kv_bytes=int(ctx.full_kv_bytes),
        notes=kv.notes,
        device_peak_kv_bytes=int(max(dev_kv, prefill_kv)),
        offload=kv.offload,
        decode_device_bytes=int(decode_total) if on_accel else 0,
        prefill_peak_device_bytes=int(prefill_total) if on_accel else 0,
    )


def activation_bytes(config, tokens: int, dtype_bytes: int) -> int:
    """Hidden states, q/k/v and the MLP's intermediate activations of one forward of `tokens`
    tokens; attention itself runs tiled (flash / CPU flash kernels) and only the last position's
    logits are computed. A rule of thumb (an upper bound), not a measurement."""
    s = text_shape(config)
    return int((tokens * (6 * s.hidden + 3 * s.intermediate) + 2 * s.vocab) * dtype_bytes)


def max_context(config, method, device_bytes: int, *, dtype_bytes: int = 2, max_new_tokens: int = 256,
                prefill_chunk_size: int | None = 4096, weights_bytes: int | None = None,
                host_bytes: int | None = None, step: int = 256) -> int:
    """The longest prompt (a multiple of `step` tokens) whose plan fits `device_bytes` of device
    memory (and `host_bytes` of host memory, when given) at its peak, prefill included; 0 when
    none does. The plans grow with the context, so a bisection finds it."""

    def fits(units: int) -> bool:
        plan = plan_memory(config, units * step, method, device="cuda", dtype_bytes=dtype_bytes,
                           max_new_tokens=max_new_tokens, prefill_chunk_size=prefill_chunk_size,
                           weights_bytes=weights_bytes)
        plan.host_available_bytes = None
        return plan.device_total_bytes <= device_bytes and (host_bytes is None or plan.host_total_bytes <= host_bytes)

    lo, hi = 0, (1 << 26) // step  # up to 64M tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * step


def advice(plan: MemoryPlan) -> str:
    tips = []
    if plan.activation_bytes > plan.device_kv_bytes / 4:
        tips.append("a smaller --prefill-chunk-size (e.g. 1024)")
    if plan.method != "omnikv":
        tips.append("--method omnikv (sparse layers' KV in the host bank)")
    else:
        tips.append("a smaller --budget or offload on")
    tips.append("a shorter prompt")
    return "try " + ", ".join(tips)


def check_fits(plan: MemoryPlan) -> None:
    """Raise ResourceError (with numbers and what to change) when the plan does not fit."""
    if plan.fits:
        return
    if plan.device_available_bytes is not None and plan.device_total_bytes > plan.device_available_bytes:
        where, need, have = "device", plan.device_total_bytes, plan.device_available_bytes
    else:
        where, need, have = "host", plan.host_total_bytes, plan.host_available_bytes or 0
    raise ResourceError(
        f"this request needs about {need / GiB:.2f} GiB of {where} memory "
        f"(weights {plan.weights_bytes / GiB:.2f}, KV {(plan.device_kv_bytes + plan.host_kv_bytes) / GiB:.2f}, "
        f"activations {plan.activation_bytes / GiB:.2f}) but {have / GiB:.2f} GiB are free; {advice(plan)}"
    )


def guard_enabled() -> bool:
    return os.environ.get("OMNIKV_MEMORY_GUARD", "1") != "0"
