"""Memory planning: how many bytes a request needs on the device and in host memory.

Used before prefill (`Session.feed` refuses a request that cannot fit, before minutes of work are
spent) and by `omnikv plan` to size hardware. Estimates, not measurements: KV bytes are exact for
the layouts this library allocates; activations are an upper-bound rule of thumb.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from omnikv._compat import layer_types, sliding_window
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


def _shape(config) -> dict[str, int]:
    cfg = config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(
        layers=cfg.num_hidden_layers,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        heads=heads,
        head_dim=head_dim,
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        vocab=cfg.vocab_size,
    )


def estimate_weights_bytes(config, dtype_bytes: int) -> int:
    s = _shape(config)
    per_layer = 4 * s["hidden"] * s["heads"] * s["head_dim"] + 3 * s["hidden"] * s["intermediate"]
    embed = s["vocab"] * s["hidden"] * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return int((s["layers"] * per_layer + embed) * dtype_bytes)


def plan_memory(
    config,
    context: int,
    method: str = "omnikv",
    *,
    device: str = "cpu",
    dtype_bytes: int = 4,
    max_new_tokens: int = 256,
    prefill_chunk_size: int | None = None,
    omnikv_config=None,
    budget: int | float | None = None,
    weights_bytes: int | None = None,
) -> MemoryPlan:
    """Estimate the memory of one request of `context` prompt tokens (batch 1)."""
    s = _shape(config)
    types = layer_types(config)
    window = sliding_window(config) or 0
    total = context + max_new_tokens
    row = 2 * s["kv_heads"] * s["head_dim"] * dtype_bytes  # K and V of one token in one layer
    rows_full = [min(total, window) if t == "sliding_attention" else total for t in types]
    full_kv = row * sum(rows_full)
    notes: list[str] = []
    on_accel = device.startswith("cuda")
    dev_kv, host_kv = full_kv, 0
    if method in ("full_offload",):
        if on_accel:
            biggest = max(rows_full) * row
            dev_kv, host_kv = 2 * biggest, full_kv
            notes.append("whole layers move host<->device every step")
    elif method == "omnikv":
        from omnikv.config import OmniKVConfig
        from omnikv.presets import preset_for_model
        from omnikv.roles import Role, plan_layers

        cfg = omnikv_config or preset_for_model(config, warn=False)
        if budget is not None:
            cfg = cfg.replace(budget=budget)
        assert isinstance(cfg, OmniKVConfig)
        plan = plan_layers(cfg, types)
        offload = cfg.offload if cfg.offload is not None else on_accel
        k = cfg.resolve_budget(context)
        dev_kv = host_kv = 0
        for i, role in enumerate(plan.roles):
            if role is Role.SPARSE:
                dev_kv += row * (k + max_new_tokens)
                if offload:
                    host_kv += row * total
                else:
                    dev_kv += row * total
            else:
                dev_kv += row * rows_full[i]
        notes.append(f"{plan.summary()}; {k} selected tokens per sparse layer; offload={'on' if offload else 'off'}")
    elif method in ("streaming_llm", "h2o", "snapkv"):
        # Prefill is full attention and these caches evict at the first decode step, so the peak
        # is the whole prompt's KV; afterwards each layer keeps its budget.
        from omnikv.methods._lossy import budget_tokens

        kept = min(budget_tokens(budget if budget is not None else 0.067, context), context)
        kept += max_new_tokens if method == "snapkv" else 0
        steady = row * sum(min(r, kept) for r in rows_full)
        notes.append(f"lossy: peak = the whole prompt until the first decode step, then {steady / GiB:.3f} GiB")
    elif method == "quest":
        # Per-page min and max keys: 2 key rows per 16 tokens, on every layer but the 2 dense ones.
        meta = sum(row // 2 * 2 * -(-r // 16) for i, r in enumerate(rows_full) if i >= 2)
        dev_kv = full_kv + meta
        notes.append("drop-free on the device: all KV + page metadata")
    chunk = prefill_chunk_size or context
    # Hidden states, q/k/v and the MLP's intermediate activations of one chunk; attention itself
    # runs tiled (flash / CPU flash kernels) and only the last position's logits are computed.
    act_elems = chunk * (6 * s["hidden"] + 3 * s["intermediate"]) + 2 * s["vocab"]
    activation = int(act_elems * dtype_bytes)
    weights = weights_bytes if weights_bytes is not None else estimate_weights_bytes(config, dtype_bytes)
    if on_accel:
        device_total = weights + dev_kv + activation
        host_total = host_kv
    else:  # everything is host memory on a CPU run
        device_total = 0
        host_total = weights + dev_kv + host_kv + activation
    return MemoryPlan(
        method=method,
        context=context,
        device=device,
        weights_bytes=int(weights),
        device_kv_bytes=int(dev_kv),
        host_kv_bytes=int(host_kv),
        activation_bytes=activation,
        device_total_bytes=int(device_total),
        host_total_bytes=int(host_total),
        device_available_bytes=device_available_bytes(device) if on_accel else None,
        host_available_bytes=host_available_bytes(),
        full_device_kv_bytes=int(full_kv),
        notes=notes,
    )


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
