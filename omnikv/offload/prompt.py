"""The prompt side of a segment: prompt rows into the Context Bank.

Not offloading, the bank is on the compute device: a prompt chunk is written into it in place and
the layers attend from views of it. Offloading, each sparse layer keeps its prefix on the device
(`prefix`, so a chunked prefill reads nothing back) and each complete chunk goes to the host bank
in packed asynchronous copies on the side stream; the prefix is dropped when decoding starts, and
comes back once (O(prompt) bytes) if a later prompt forward (a new chat turn) needs it. Generated
rows join the bank when a prompt forward follows a decode run. Every copy, stream and event goes
through the segment's `Transfer` (omnikv/offload/transfer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from omnikv.hf.buffers import KVBuffer
from omnikv.offload.bank import PackedBank, WorkBuffer
from omnikv.offload.transfer import Transfer


FLUSH_BLOCK = 4096  # tokens per packed device->host copy when prompt rows move to the bank

# packer(lo, hi, out) fills out (hi - lo, B, L, 2, H, D) on the device with rows lo..hi
Packer = Callable[[int, int, torch.Tensor], None]


class PromptWriter:
    """Writes the prompt rows of one segment's sparse layers into its bank."""

    def __init__(self, bank: PackedBank, transfer: Transfer, device: torch.device, stream: Any, link: bool) -> None:
        self.bank = bank
        self.transfer = transfer
        self.device = device  # the compute device
        self.stream = stream  # the side stream (None without a link)
        self.link = link  # the bank is across a host<->device link
        self.prefix: list[KVBuffer] | None = None  # offload: device copies of the prompt rows, per layer
        self.pack: torch.Tensor | None = None  # device (n, B, L, 2, H, D) a copy to the bank packs into

    def write(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..start+n of layer `slot` from a prompt forward (B, H, n, D); returns what that
        layer attends to: every row so far, (B, H, start + n, D)."""
        n = key.shape[-2]
        b, h, _, d = key.shape
        bank, end = self.bank, start + n
        bank.reserved = max(bank.reserved, end)
        last = slot == bank.num_layers - 1  # the segment's last layer: the chunk is complete
        if self.link:
            if self.prefix is None:
                self.prefix = [KVBuffer(headroom=0) for _ in range(bank.num_layers)]
            buf = self.prefix[slot]
            buf.reserve(bank.reserved, key)
            k_all, v_all = buf.append(key, value)
            if last:
                bank.ensure(end, b, h, d, key.dtype, self._side_done())
                self._send_to_bank(start, end, self._prefix_packer())
                bank.length = end
            return k_all, v_all
        bank.ensure(end, b, h, d, key.dtype)
        rows = bank.data[start:end, :, slot]  # (n, B, 2, H, D)
        rows[:, :, 0].copy_(key.permute(2, 0, 1, 3))
        rows[:, :, 1].copy_(value.permute(2, 0, 1, 3))
        if last:
            bank.length = end
        if start == 0:
            return key, value
        return bank.layer_view(slot, end)

    def flush_generated(self, work: WorkBuffer) -> None:
        """The generated rows (in `work`) become prompt rows: append them to the bank."""
        bank, g, k = self.bank, work.generated, work.k
        start, end = bank.length, bank.length + g
        _, _, b, h, _, d = work.data.shape
        bank.ensure(end, b, h, d, work.data.dtype, self._side_done())
        data = work.data
        self.transfer.wait(work.ready, self.device)

        def packer(lo: int, hi: int, out: torch.Tensor) -> None:
            out.copy_(data[..., k + lo - start : k + hi - start, :].permute(4, 2, 0, 1, 3, 5))

        if self.link:
            self.transfer.keep_alive(data, self.stream)
            self._send_to_bank(start, end, packer)
        else:
            bank.data[start:end].copy_(data[..., k : k + g, :].permute(4, 2, 0, 1, 3, 5))
        bank.length = end

    def restore_prefix(self) -> None:
        """Offload, a new prompt forward after decoding: the bank's rows back on the device once
        (O(prompt) bytes per turn), as layer-major prefix buffers, in blocks of `FLUSH_BLOCK`
        tokens (one contiguous copy each) so that no second full copy is ever on the device."""
        bank, t = self.bank, self.transfer
        n = bank.length
        _, b, lsz, _, h, d = bank.data.shape
        like = torch.empty((b, h, 0, d), dtype=bank.data.dtype, device=self.device)
        self.prefix = [KVBuffer(headroom=0) for _ in range(lsz)]
        for buf in self.prefix:
            buf.reserve(max(bank.reserved, n), like)
        t.after_compute(self.stream, self.device)
        for lo in range(0, n, FLUSH_BLOCK):
            hi = min(lo + FLUSH_BLOCK, n)
            staged = torch.empty((hi - lo, b, lsz, 2, h, d), dtype=bank.data.dtype, device=self.device)
            t.copy(self.stream, staged, bank.data[lo:hi])
            t.wait(t.record(self.stream, self.device), self.device)  # device-side: the host goes on
            t.keep_alive(staged, self.stream)
            for s, buf in enumerate(self.prefix):
                buf.append(staged[:, :, s, 0].permute(1, 2, 0, 3), staged[:, :, s, 1].permute(1, 2, 0, 3))

    def drop_prefix(self) -> None:
        """Decoding starts: the device prefix is no longer needed (its memory is kept alive for
        the side stream's pending copies by `keep_alive`)."""
        self.prefix = None
        self.pack = None  # so is the pack buffer's (~16 MiB per sparse layer, not KV: not counted)

    def device_bytes(self) -> int:
        return 0 if self.prefix is None else sum(buf.used_bytes() for buf in self.prefix)

    def allocated_bytes(self) -> int:
        return 0 if self.prefix is None else sum(buf.allocated_bytes() for buf in self.prefix)

    # -- the packed copy to the bank ----------------------------------------------------------------
    def _prefix_packer(self) -> Packer:
        """A packer over the current prefix buffers (captured now: the side stream may run it
        after decoding started and dropped them)."""
        prefix = list(self.prefix)

        def packer(lo: int, hi: int, out: torch.Tensor) -> None:
            for s, buf in enumerate(prefix):
                out[:, :, s, 0].copy_(buf.keys[:, :, lo:hi].permute(2, 0, 1, 3))
                out[:, :, s, 1].copy_(buf.values[:, :, lo:hi].permute(2, 0, 1, 3))

        for buf in prefix:  # read on the side stream: keep their memory until it is done
            self.transfer.keep_alive(buf.keys, self.stream)
            self.transfer.keep_alive(buf.values, self.stream)
        return packer

    def _pack_buffer(self, n: int) -> torch.Tensor:
        _, b, lsz, _, h, d = self.bank.data.shape
        row = b * lsz * 2 * h * d
        if self.pack is None or self.pack.numel() < n * row:
            self.pack = torch.empty(max(n, 1) * row, dtype=self.bank.data.dtype, device=self.device)
        return self.pack[: n * row].view(n, b, lsz, 2, h, d)

    def _send_to_bank(self, start: int, end: int, packer: Packer) -> None:
        """Rows start..end to the host bank: packed on the device and copied in blocks of at most
        `FLUSH_BLOCK` tokens, all on the side stream (the compute stream does not wait)."""
        t = self.transfer
        t.after_compute(self.stream, self.device)  # the rows the compute stream wrote are ready
        pack = self._pack_buffer(min(FLUSH_BLOCK, end - start))
        for lo in range(start, end, FLUSH_BLOCK):
            hi = min(lo + FLUSH_BLOCK, end)
            out = pack[: hi - lo]
            # Packing runs on the side stream: blocks reuse `pack` in stream order.
            t.launch(self.stream, lambda lo=lo, hi=hi, out=out: packer(lo, hi, out), writes=(out,))
            t.copy(self.stream, self.bank.data[lo:hi], out)
        t.keep_alive(pack, self.stream)
        self.bank.written = t.record(self.stream, self.device)

    def _side_done(self) -> Any:
        """An event after all work issued so far on the side stream (None without a link)."""
        return self.transfer.record(self.stream, self.device) if self.link else None
