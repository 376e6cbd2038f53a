"""Masks for layers that hand attention a subset of their KV rows (pure torch, no transformers).

transformers builds one causal/padding mask over the logical sequence; a layer that attends to a
subset of rows (a sparse layer's selection, a baseline's kept rows) gathers the matching columns.
"""

from __future__ import annotations

import torch


def positions_mask(
    attention_mask: torch.Tensor | None, positions: torch.Tensor, num_q_heads: int
) -> torch.Tensor | None:
    """Adapt a (B, 1, q, N) bool mask over logical positions to a subset of KV rows.

    Args:
        attention_mask: (B, 1, q, N) bool (True = attend) or None (nothing masked).
        positions: (B, G, n) logical position of each returned KV row (G = 1 or Hk).
    Returns:
        (B, 1 or Hq, q, n) bool mask, or None when `attention_mask` is None.
    """
    if attention_mask is None:
        return None
    b, g, n = positions.shape
    q = attention_mask.shape[2]
    mask = attention_mask[:, :1].expand(b, g, q, attention_mask.shape[-1])
    out = mask.gather(-1, positions[:, :, None, :].expand(b, g, q, n))
    if g > 1:
        out = out.repeat_interleave(num_q_heads // g, dim=1)
    return out
