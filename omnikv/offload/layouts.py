"""Row movement over the two layouts of omnikv/offload/bank.py, with torch operations: the bank's
token-major (T, B, L, 2, H, D) and the working buffer's layer-major (L, 2, B, H, capacity, D).
Every gather strategy (gathers.py) and the partial-reload kernel's reference (reload.py) use these."""

from __future__ import annotations

import torch


def gather_packed(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Bank rows (T, B, L, 2, H, D) at positions idx (B, G, k) -> (k, B, L, 2, H, D), contiguous.

    G = 1: one index_select of whole token blocks over the bank viewed as (T * B, ...). G = H
    (`per_kv_head`): each head its own positions."""
    b, g, k = idx.shape
    if g == 1:
        flat = (idx[:, 0, :] * data.shape[1] + torch.arange(b, device=idx.device)[:, None]).t().reshape(-1)
        return data.flatten(0, 1).index_select(0, flat).view(k, b, *data.shape[2:])
    bi = torch.arange(b, device=idx.device).view(b, 1, 1)
    hi = torch.arange(g, device=idx.device).view(1, g, 1)
    out = data[idx, bi, :, :, hi, :]  # (B, H, k, L, 2, D)
    return out.permute(2, 0, 3, 4, 1, 5).contiguous()


def to_work_layout(rows: torch.Tensor) -> torch.Tensor:
    """(M, B, L, 2, H, D) -> (L, 2, B, H, M, D), a view."""
    return rows.permute(2, 3, 1, 4, 0, 5)


def gather_into(data: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out (L, 2, B, H, k, D) <- bank `data` (T, B, L, 2, H, D) rows idx (B, G, k)."""
    b, g, k = idx.shape
    if b == 1 and g == 1:
        # One pass: index_select over the token axis of the layer-major view of the bank, written
        # in place (on one device there is no link to favour whole-token reads).
        torch.index_select(data.permute(2, 3, 1, 4, 0, 5), 4, idx[0, 0], out=out)
        return
    out.copy_(to_work_layout(gather_packed(data, idx)))


def scatter_rows(dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """dst (L, 2, B, H, k, D)[..., slots, :] <- rows (L, 2, B, H, M, D); slots (B, G, M)."""
    b, g, m = slots.shape
    if b == 1 and g == 1:
        dst.index_copy_(dst.dim() - 2, slots[0, 0], rows)
        return
    lsz, two, _, h, _, d = rows.shape
    index = slots.view(1, 1, b, g, m, 1).expand(lsz, two, b, h, m, d)
    dst.scatter_(dst.dim() - 2, index, rows)
