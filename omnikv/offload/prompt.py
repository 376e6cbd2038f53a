"""The prompt side of a segment: prompt rows into the Context Bank.

Not offloading, the bank is on the compute device: a prompt chunk is written into it in place and
the layers attend from views of it. Offloading, a prompt forward goes through the segment's
`PrefixStream` (omnikv/offload/stream.py): each sparse layer's prefix is read back from the host
bank one layer ahead and each complete chunk is sent to the bank, so the sparse layers' prompt rows
do not stay on the device. Generated rows join the bank when a prompt forward follows a decode
run. Every copy, stream and event goes through the segment's `Transfer` (omnikv/offload/transfer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from omnikv.offload.bank import PackedBank, WorkBuffer
from omnikv.offload.stream import PrefixStream
from omnikv.offload.transfer import Transfer


FLUSH_BLOCK = 4096  # tokens per packed device->host copy when generated rows move to the bank

# packer(lo, hi, out) fills out (hi - lo, B, L, 2, H, D) on the device with rows lo..hi
Packer = Callable[[int, int, torch.Tensor], None]


class PromptWriter:
    """Writes the prompt rows of one segment's sparse layers into its bank."""

    def __init__(self, bank: PackedBank, transfer: Transfer, device: torch.device, side: Any, link: bool) -> None:
        self.bank = bank
        self.transfer = transfer
        self.device = device  # the compute device
        self.side = side  # the side stream (None without a link)
        self.link = link  # the bank is across a host<->device link
        self.stream = PrefixStream(bank, transfer, device, side) if link else None

    def write(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..start+n of layer `slot` from a prompt forward (B, H, n, D); returns what that
        layer attends to: every row so far, (B, H, start + n, D)."""
        n = key.shape[-2]
        b, h, _, d = key.shape
        bank, end = self.bank, start + n
        bank.reserved = max(bank.reserved, end)
        if self.link:
            return self.stream.write(slot, key, value, start)
        last = slot == bank.num_layers - 1  # the segment's last layer: the chunk is complete
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
            self.transfer.keep_alive(data, self.side)
            self._send_to_bank(start, end, packer)
        else:
            bank.data[start:end].copy_(data[..., k : k + g, :].permute(4, 2, 0, 1, 3, 5))
        bank.length = end

    def device_bytes(self) -> int:
        """Device bytes held between the layers of a prompt forward (prefixes read ahead, the
        pack buffer); 0 once the forward is done."""
        return 0 if self.stream is None else self.stream.device_bytes()

    def _pack_buffer(self, n: int) -> torch.Tensor:
        """Device (n, B, L, 2, H, D) the generated rows are packed into; dropped after the copy."""
        _, b, lsz, _, h, d = self.bank.data.shape
        return self.transfer.device_empty((max(n, 1), b, lsz, 2, h, d), self.bank.data.dtype, self.device)[:n]

    def _send_to_bank(self, start: int, end: int, packer: Packer) -> None:
        """Rows start..end to the host bank: packed on the device and copied in blocks of at most
        `FLUSH_BLOCK` tokens, all on the side stream (the compute stream does not wait)."""
        t = self.transfer
        t.after_compute(self.side, self.device)  # the rows the compute stream wrote are ready
        pack = self._pack_buffer(min(FLUSH_BLOCK, end - start))
        for lo in range(start, end, FLUSH_BLOCK):
            hi = min(lo + FLUSH_BLOCK, end)
            out = pack[: hi - lo]
            # Packing runs on the side stream: blocks reuse `pack` in stream order.
            t.launch(self.side, lambda lo=lo, hi=hi, out=out: packer(lo, hi, out), writes=(out,))
            t.copy(self.side, self.bank.data[lo:hi], out)
        t.keep_alive(pack, self.side)
        self.bank.written = t.record(self.side, self.device)

    def _side_done(self) -> Any:
        """An event after all work issued so far on the side stream (None without a link)."""
        return self.transfer.record(self.side, self.device) if self.link else None
