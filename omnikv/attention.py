"""The attention function registered with transformers under the name "omnikv".

It adds no behaviour of its own: it asks the cache that just updated this layer how to attend
(dense, selecting, sparse, page-selected ...). Without one of our caches it is plain SDPA, so a model
switched to "omnikv" still works with any other cache or with `use_cache=False`.
"""

from __future__ import annotations

import torch

from omnikv import _context
from omnikv._compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask

ATTN_NAME = "omnikv"


def omnikv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Shapes: query (B, Hq, q, D); key/value (B, Hk, n, D) as returned by the cache's update;
    attention_mask (B, 1, q, N) bool over *logical* positions or None. Returns (B, q, Hq, D)."""
    cache = _context.take(getattr(module, "layer_idx", -1))
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return cache.attend(module.layer_idx, module, query, key, value, attention_mask, **kwargs)


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
