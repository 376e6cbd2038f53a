"""Masks over a subset of KV rows, shared by the budgeted methods (StreamingLLM, H2O, SnapKV, Quest).

Those methods attend to some rows of a layer, each at its logical position; attention does not
depend on the order of the rows, so only the mask has to follow them.
"""

from __future__ import annotations

import torch

from omnikv.hf.masks import positions_mask


def subset_mask(
    attention_mask: torch.Tensor | None, positions: torch.Tensor, q_start: int, q: int, num_q_heads: int
) -> torch.Tensor:
    """(B, 1|Hq, q, n) bool mask of q queries at q_start.. over KV rows at `positions` (B, G, n).

    Gathers the logical mask when there is one (`selection.positions_mask`); otherwise (no
    padding) builds the causal mask at those positions.
    """
    if attention_mask is not None:
        return positions_mask(attention_mask, positions, num_q_heads)
    g = positions.shape[1]
    qpos = torch.arange(q_start, q_start + q, device=positions.device)
    out = positions[:, :, None, :] <= qpos[None, None, :, None]
    return out.repeat_interleave(num_q_heads // g, dim=1) if g > 1 else out


def first_real(valid: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B, 1) position of each sequence's first real token (its left-padding length).

    valid: (B, N) bool over logical positions (False = padding) or None (no padding)."""
    if valid is None:
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    return (~valid).sum(dim=-1, keepdim=True)
