"""Where a segment's rows live (see docs/how-it-works.md, "Transfers"); L sparse layers in the
segment, B batch, H KV heads, D head dim:

* `PackedBank`, the Context Bank: every prompt row of the segment's sparse layers, token-major
  (capacity, B, L, 2, H, D), in host memory when offloading. One token's K and V of every layer of
  the segment and every sequence of the batch are one contiguous block, so a prompt chunk is one
  contiguous host<->device copy and a gathered token is one contiguous read;
* `WorkBuffer`, the working buffer: the rows the sparse layers attend when decoding, on the
  compute device, layer-major as attention wants it, (L, 2, B, H, k + decode capacity, D): the k
  selected prompt rows (their positions in `indices`, slot order), then the generated tokens, which
  never leave the device during a decode run (they reach the bank in one copy when a later prompt
  forward makes them part of the prompt). `WorkBuffer` grows (eager decoding); `StaticWork` has one
  shape for a whole static run and is written with index tensors only (omnikv/hf/static.py).

What moves rows between them: omnikv/offload/prompt.py (prompt rows into the bank) and the gather
strategies of omnikv/offload/gathers.py (selected rows into the working buffer).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from omnikv.hf.buffers import grown_capacity
from omnikv.hf.static import mark_static
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
        self.on_device = False  # offload off: the bank is device KV, counted by the meter

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
        if self.on_device:
            self.transfer.meter.track(data)
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


class WorkBuffer:
    """The selected rows + generated rows of one segment, growable (eager decoding)."""

    def __init__(self, transfer: Transfer, device: torch.device | None) -> None:
        self.transfer = transfer
        self.device = device
        self.data: torch.Tensor | None = None  # (L, 2, B, H, capacity, D)
        self.k = 0  # selected rows at the front
        self.generated = 0  # generated rows after them
        self.indices: torch.Tensor | None = None  # (B, G, k) positions of the selected rows, slot order
        self.ready: Any = None  # event: the last load has landed in `data`

    def ensure(self, k: int, generated: int, bank: PackedBank, decode_reserve: int) -> None:
        """Room for k selected + `generated` rows, in the bank's geometry. Growing keeps what is
        there; only when a request did not announce its length (`decode_reserve`) does this
        reallocate during decoding."""
        need = k + generated
        if self.data is not None and self.k == k and self.data.shape[-2] >= need:
            return
        _, b, lsz, _, h, d = bank.data.shape
        if self.data is None:
            cap = k + max(decode_reserve, generated, 1)
        else:
            cap = grown_capacity(need, self.data.shape[-2], 64)
        data = self.transfer.device_empty((lsz, 2, b, h, cap, d), bank.data.dtype, self.device)
        if self.data is not None:
            self.transfer.wait(self.ready, self.device)  # a pending load still writes the old buffer
            if self.k == k:
                data[..., : k + self.generated, :].copy_(self.data[..., : k + self.generated, :])
            elif self.generated:
                data[..., k : k + self.generated, :].copy_(self.data[..., self.k : self.k + self.generated, :])
        self.data = data

    def selection(self) -> torch.Tensor:
        """The k selected rows, (L, 2, B, H, k, D): what a gather fills."""
        return self.data[..., : self.k, :]

    def append(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Layer `slot`'s K/V (B, H, 1, D) of the newest generated token (counted by the caller)."""
        pos = self.k + self.generated - 1
        self.data[slot, 0, :, :, pos : pos + 1].copy_(key)
        self.data[slot, 1, :, :, pos : pos + 1].copy_(value)

    def attended(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `slot`'s rows in use, (B, H, k + generated, D) each."""
        n = self.k + self.generated
        return self.data[slot, 0, :, :, :n], self.data[slot, 1, :, :, :n]

    def generated_rows(self, slot: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `slot`'s first `g` generated rows, (B, H, g, D) each."""
        return self.data[slot, 0, :, :, self.k : self.k + g], self.data[slot, 1, :, :, self.k : self.k + g]

    def used_bytes(self) -> int:
        if self.data is None:
            return 0
        lsz = self.data.shape[0]
        row = self.data[0, 0, :, :, :1].numel() * self.data.element_size()
        return 2 * row * lsz * (self.k + self.generated)

    def allocated_bytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class StaticWork(WorkBuffer):
    """The working buffer of a static decode run: sized exactly k + `decode_rows` and zeroed once,
    outside compiled code; every step writes it with index tensors and attends all of it (rows
    not generated yet sit at logical positions >= the current one: the causal mask hides them)."""

    def __init__(self, transfer: Transfer, device: torch.device, bank: PackedBank, k: int, decode_rows: int) -> None:
        super().__init__(transfer, device)
        _, b, lsz, _, h, d = bank.data.shape
        self.data = transfer.meter.zeros((lsz, 2, b, h, k + decode_rows, d), bank.data.dtype, device)
        self.k = k
        # (1, 1, decode capacity) logical positions of the generated-token slots
        self.gen_positions = (bank.length + torch.arange(decode_rows, device=device)).view(1, 1, -1)
        self.prompt_length = bank.length
        # Index tensors for writes into `data` itself, never into a view of it: traced, a write
        # into a view (`data[slot, 0].index_copy_`, `data[..., :k, :].copy_`) is functionalized
        # into a rebuild of the whole tensor per write (profiled: tens of ms a step at 4K), while
        # a write into the graph input is done in place.
        ar = functools.partial(torch.arange, device=device)
        self.k_rows = ar(k)
        self.write_idx = (ar(lsz).view(lsz, 1, 1, 1), ar(2).view(1, 2, 1, 1),
                          ar(b).view(1, 1, b, 1), ar(h).view(1, 1, 1, h))
        mark_static(device, self.data, self.gen_positions, self.k_rows, *self.write_idx)

    def write_selection(self, rows: torch.Tensor) -> None:
        """rows (L, 2, B, H, k, D) into the first k slots (into `data` itself: see __init__)."""
        self.data.index_copy_(4, self.k_rows, rows)

    def append_at(self, slot: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A static step's (B, H, 1, D) K/V of layer `slot`, written at slot k + pos - prompt
        length (`pos` a 0-d device tensor); returns all k + decode-capacity rows (B, H, n, D)."""
        at = (pos - self.prompt_length + self.k).view(1, 1, 1, 1)
        layers, kv, batch, heads = self.write_idx
        # (1, 2, B, H, D) rows written at [slot, {K, V}, b, h, at] of `data` itself (see __init__)
        rows = torch.stack([key[:, :, 0], value[:, :, 0]]).unsqueeze(0)
        self.data.index_put_((layers[slot : slot + 1], kv, batch, heads, at), rows)
        return self.data[slot, 0], self.data[slot, 1]

    def positions(self) -> torch.Tensor:
        """(B, G, k + decode capacity) logical positions of the rows `append_at` returns."""
        b, g, _ = self.indices.shape
        return torch.cat([self.indices, self.gen_positions.expand(b, g, -1)], dim=-1)
