"""The attention seam: the function registered with transformers under the name "omnikv", and the
one-shot hand-off that tells it which cache to ask.

It adds no behaviour of its own: it asks the cache that just updated this layer how to attend
(dense, selecting, sparse, page-selected ...). Without one of our caches it is plain SDPA, so a model
switched to "omnikv" still works with any other cache or with `use_cache=False`.

The hand-off: transformers calls `cache.update(k, v, layer_idx)` and then, in the same attention
module, the registered attention function, which does not receive the cache. `update` leaves
(cache, layer) with `put`; the attention function takes it (and clears it) with `take`, so a
forward pass without one of our caches never sees stale state. Thread-local: each server worker
thread has its own slot.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from omnikv.errors import InputError
from omnikv.hf.compat import (CACHE_KWARG, TRANSFORMERS_VERSION, AttentionInterface, AttentionMaskInterface, Cache,
                              sdpa_attention_forward, sdpa_mask)

ATTN_NAME = "omnikv"

_local = threading.local()


def put(cache: Any, layer_idx: int) -> None:
    """`cache` just updated `layer_idx`: its attention call comes next."""
    _local.slot = (cache, layer_idx)


def take(layer_idx: int) -> Any | None:
    """The cache that just updated `layer_idx`, or None (consumed on read)."""
    slot = getattr(_local, "slot", None)
    if slot is None or slot[1] != layer_idx:
        return None
    _local.slot = None
    return slot[0]


def omnikv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Shapes: query (B, Hq, q, D); key/value (B, Hk, n, D) as returned by the cache's update;
    attention_mask (B, 1, q, N) bool over *logical* positions or None. Returns (B, q, Hq, D).
    `dropout` may come positionally, as in transformers' own attention functions' signature
    (kvpress's import wraps every registered attention function and calls them so)."""
    if dropout:
        kwargs["dropout"] = dropout
    cache = take(getattr(module, "layer_idx", -1))
    if cache is None:
        if CACHE_KWARG != "cache" and isinstance(kwargs.get("cache"), Cache):
            # Before 5.24 the model takes `past_key_values=`; a cache passed as `cache=` reaches only
            # this function's kwargs, and the forward would silently run full attention without it.
            raise InputError(
                f"the cache was passed as `cache=`, which transformers {TRANSFORMERS_VERSION} does not "
                f"take (it became the keyword in 5.24): pass it as `{CACHE_KWARG}=cache`, or as "
                "`**omnikv.cache_kwargs(cache)`, which names the keyword of the installed version")
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    return cache.attend(module.layer_idx, module, query, key, value, attention_mask, **kwargs)


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with its single-query GQA packing kept under torch.compile.

    For one query token transformers reshapes the query (B, Hq, 1, D) to (B, Hk, Hq/Hk, D), so SDPA
    reads every key/value head once, but only eagerly (`not is_torchdynamo_compiling()`); traced,
    it falls back to `repeat_kv`, which copies the whole K/V of the layer Hq/Hk times every step
    (profiled on SmolLM2 at 4K: a fused copy kernel as long as the attention itself, and the
    attention twice as slow). Traced, we pack here instead: the same arithmetic as the eager path.

    Shapes: query (B, Hq, q, D); key/value (B, Hk, N, D); attention_mask (B, 1 or Hq, q, N) bool
    or None. Returns ((B, q, Hq, D), None)."""
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if (
        groups > 1
        and query.shape[2] == 1
        and torch.compiler.is_compiling()
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and (attention_mask is None or attention_mask.shape[1] in (1, query.shape[1]))
    ):
        b, hq, _, d = query.shape
        q = query.reshape(b, hq // groups, groups, d)
        mask = attention_mask
        if mask is not None and mask.shape[1] != 1:
            mask = mask.reshape(b, hq // groups, groups, mask.shape[-1])
        scale = kwargs.get("scaling")
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def ensure_registered() -> None:
    """Register the attention and mask functions (idempotent; adds a new name, patches nothing)."""
    AttentionInterface.register(ATTN_NAME, omnikv_attention)
    # Without a mask function for our name transformers would build no mask at all and prefill
    # would silently run without causal masking. SDPA's boolean masks are what we need.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_omnikv_attention(model: torch.nn.Module) -> None:
    """Switch `model` to the "omnikv" attention function (a public transformers API)."""
    ensure_registered()
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


# ---------------------------------------------------------------------------------------------
# Explicit attention weights, for the code that needs them (SDPA does not return them): H2O's
# accumulated attention, SnapKV's votes, telemetry. One masked GQA softmax for all of them.


def scaling_of(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    """The attention scale the model uses (Gemma's query_pre_attn_scalar, else 1/sqrt(D))."""
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else query.shape[-1] ** -0.5


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, *, inplace: bool = False) -> torch.Tensor:
    """float32 softmax over the last dim with `mask` (bool, True = attend, broadcastable to
    `logits`); rows with nothing to attend (padding queries) are 0, not NaN. `inplace` lets it
    overwrite float32 `logits` with the masked values (saves a copy of a large score tensor)."""
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill_(~mask, float("-inf")) if inplace else logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def grouped_logits(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention logits (unscaled) of grouped decode queries against one layer's keys.

    Shapes: query (B, Hk, g, D) (the g query heads of each KV head); keys (B, Hk, N, D).
    Returns (B, Hk, g, N) in the inputs' dtype.

    Eagerly a matrix product. Traced for CPU it is a multiply-and-sum instead, which inductor
    turns into one vectorised reduction that reads the keys once: with max-autotune
    (`omnikv.hf.static.CPU_INDUCTOR_CONFIG`) a product against the keys becomes inductor's C++ GEMM
    template, which first copies and re-packs the whole (non-constant) key buffer every step -
    measured on SmolLM2's shape at 16K, 4.5-14 ms for what the reduction does in 0.5 ms and
    ATen's product in ~1 ms (`benchmarks/micro_filter_attention.py`). Eagerly the multiply-and-sum would
    materialise a (B, Hk, g, N, D) product, so it is kept for traced CPU code only."""
    if torch.compiler.is_compiling() and keys.device.type == "cpu":
        return (query.unsqueeze(-2) * keys.unsqueeze(2)).sum(-1)
    return torch.matmul(query, keys.transpose(-1, -2))


def attention_probs(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention weights, float32, grouped by KV head.

    Args:
        query: (B, Hq, q, D); keys: (B, Hk, n, D); mask: (B, 1 | Hk | Hq, q, n) bool (True =
            attend) or None.
    Returns:
        (B, Hk, g, q, n) with g = Hq // Hk; rows with nothing to attend (padding queries) are 0.
    """
    b, hq, q, d = query.shape
    hk, n = keys.shape[1], keys.shape[-2]
    g = hq // hk
    logits = torch.matmul(query.reshape(b, hk, g * q, d).float(), keys.float().transpose(-1, -2))
    logits = logits.mul_(scaling).view(b, hk, g, q, n)
    if mask is not None:
        heads = mask.shape[1]
        mask = mask.view(b, hk, g, q, n) if heads == hq else mask.view(b, heads, 1, q, n)  # heads 1 or Hk
    return masked_softmax(logits, mask, inplace=True)
