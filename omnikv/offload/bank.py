"""The Context Bank of a segment: every prompt row of its sparse layers, token-major (see
docs/how-it-works.md, "Transfers"). The gathers over this layout are in omnikv/offload/gathers.py.

Layout (L sparse layers in the segment, B batch, H KV heads, D head dim): (capacity, B, L, 2, H, D).
One token's K and V of every layer of the segment and every sequence of the batch are one
contiguous block, so a prompt chunk is one contiguous host<->device copy and a gathered token is
one contiguous read. The working buffer the rows are gathered into is layer-major,
(L, 2, B, H, rows, D), as attention wants it (omnikv/offload/segment.py).
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv.hf.buffers import grown_capacity
from omnikv.offload.transfer import Transfer


class PackedBank:
    """Token-major storage (capacity, B, L, 2, H, D) of one segment's prompt rows.

    Sized once by the segment's reservation (`reserved`: exactly, no power-of-two pinned blocks,
    no growth in a request that announced its length); grows by x1.5 only when a caller did not
    say how long it would be. `written` is the event after which every row sent to the bank so
    far has landed (None: nothing pending).
    """

    def __init__(self, num_layers: int, transfer: Transfer, device: torch.device) -> None:
        self.num_layers = num_layers
        self.transfer = transfer
        self.device = device  # where the rows live: the host when offloading
        self.data: torch.Tensor | None = None
        self.length = 0  # rows in use (every layer of the segment has written them)
        self.reserved = 0  # rows announced by `Segment.reserve` (and the longest prompt so far)
        self.written: Any = None  # event: the last rows sent to the bank have landed
        self.source: torch.Tensor | None = None  # what the gather kernel reads (a mapped view on CUDA)

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[0]

    def ensure(self, rows: int, b: int, h: int, d: int, dtype: torch.dtype, pending: Any = None) -> None:
        """Room for `rows` rows; `pending` = an event after which every side-stream use of the bank
        (copies into it, gathers from it) is done: growing frees the old storage, so the host
        waits for it (only when a request did not announce its length)."""
        if self.data is not None and rows <= self.capacity:
            return
        cap = max(rows, self.reserved) if self.data is None else grown_capacity(rows, self.capacity, 0)
        data = self.transfer.host_empty((cap, b, self.num_layers, 2, h, d), dtype, self.device)
        if self.data is not None and self.length:
            self.transfer.host_wait(pending, "bank growth: earlier rows still arriving")
            data[: self.length].copy_(self.data[: self.length])
        self.data = data
        self.source = None

    def gather_source(self, compute_device: torch.device) -> torch.Tensor:
        """The whole bank as the gather kernel reads it. Asking settles the transfer's strategy:
        a CUDA driver that cannot map host memory switches it to the host gather."""
        if self.source is None:
            self.source = self.transfer.gather_source(self.data, compute_device)
        return self.source

    def layer_view(self, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `slot`'s first `end` rows as (B, H, end, D) views (strided) of the bank."""
        rows = self.data[:end, :, slot]  # (end, B, 2, H, D)
        return rows[:, :, 0].permute(1, 2, 0, 3), rows[:, :, 1].permute(1, 2, 0, 3)

    def token_bytes(self) -> int:
        """Bytes of one token of one sequence across the segment: L * 2 * H * D elements."""
        _, _, lsz, _, h, d = self.data.shape
        return lsz * 2 * h * d * self.data.element_size()

    def used_bytes(self) -> int:
        if self.data is None:
            return 0
        return self.length * self.data[0].numel() * self.data.element_size()

    def allocated_bytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()
