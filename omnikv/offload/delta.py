"""The partial reload's delta: which slots of a working buffer must be rewritten, and with which
rows, when its selection changes (pure torch; tests/reference.py holds a slow twin)."""

from __future__ import annotations

import torch


def selection_delta(prev: torch.Tensor, new: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to reload when a working buffer holding selection `prev` must hold `new`.

    Consecutive selections overlap heavily on real text (~75-80% at 4K on SmolLM2), so keeping the
    rows that stay selected in their slots and rewriting only the stale slots moves a fraction of
    the bytes of a full gather. Attention does not depend on the order of its KV rows, so the
    buffer's slot order is free.

    Args:
        prev: (B, G, k) positions held by the k slots (distinct within each (b, g) row).
        new: (B, G, k) the new selection (distinct within each row).
        length: T, larger than every position.
    Returns:
        slots (B, G, M) and tokens (B, G, M): writing the row of position tokens[..., j] into slot
        slots[..., j] turns `prev` into a permutation of `new`. M is the largest number of changed
        slots over the rows; a row with fewer changes is padded with slots that are rewritten with
        the position they already hold. M = 0 when nothing changed.
    """
    slots, tokens, changed = selection_delta_padded(prev, new, length)
    m = int(changed.sum(-1).max())  # a host read: the caller sizes its copy from it
    return slots[..., :m], tokens[..., :m]


def selection_delta_padded(prev: torch.Tensor, new: torch.Tensor,
                           length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`selection_delta` at a fixed width and without reading anything back to the host (a GPU
    step that must not sync, or a captured one): slots, tokens (B, G, k) and `changed` (B, G, k)
    bool, True for the first `count` columns of each row (its changed slots). The other columns
    hold (slot, the position it already holds): rewriting them is a no-op, and a kernel with
    masked loads (omnikv/offload/reload.py) skips them, so only changed rows are read."""
    b, g, k = prev.shape
    member = torch.zeros(2, b, g, length, dtype=torch.bool, device=prev.device)
    member[0].scatter_(-1, new, True)
    member[1].scatter_(-1, prev, True)
    stale = ~member[0].gather(-1, prev)  # (B, G, k): this slot's position left the selection
    fresh = ~member[1].gather(-1, new)  # (B, G, k): this position is not in the buffer yet
    count = stale.sum(-1, keepdim=True)  # equals fresh.sum(-1): both sets have k distinct members
    # Stable sorts bring the stale slots / fresh positions first, each in its original order.
    slots = torch.sort((~stale).to(torch.uint8), dim=-1, stable=True).indices
    tokens = new.gather(-1, torch.sort((~fresh).to(torch.uint8), dim=-1, stable=True).indices)
    changed = torch.arange(k, device=prev.device) < count  # (B, G, k)
    tokens = torch.where(changed, tokens, prev.gather(-1, slots))
    return slots, tokens, changed
