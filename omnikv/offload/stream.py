"""The offload prefill: sparse layers' prompt rows leave the device as the prompt runs.

A prompt forward with offload on must give each sparse layer full attention over every row so far,
while the rows live in the host bank. Keeping every sparse layer's prefix on the device (what this
package did before) puts the whole prompt of every layer there at the peak (~1.8x full attention's
KV for Llama-3-8B at 128K), so the longest context that fits is *shorter* than full attention's.

`PrefixStream` is the chunk-major alternative (docs/how-it-works.md, "The offload prefill", says
why not layer-major: driving the model one layer at a time would fork its forward). For a chunk of
n rows starting at `start`, per sparse layer of the segment:

* its prefix (rows 0..start, layer-major `(2, B, H, start + n, D)`) is read back from the bank on
  the side stream, *one layer ahead*: the filter layer starts the first layer's read, each sparse
  layer starts the next one's, so the copy runs under the previous layer's compute;
* the chunk's own rows are written behind the prefix (the layer attends to the whole buffer) and
  packed into `chunk`, `(n, B, L, 2, H, D)` token-major like the bank: after the segment's last
  layer, one contiguous copy sends the chunk to the bank, and nothing of it stays on the device.

On the device at once: the dense layers' KV, at most two sparse layers' prefixes (the one
attending, the one arriving) and one chunk of the segment's rows (the previous chunk's copy to
the bank is done before the next chunk's first layer takes a pack buffer: its first read waits
behind it on the side stream). The one exception is the first chunk, which reads nothing back:
every segment's pack of it may still be in flight when the second chunk's first read starts
(`omnikv.methods.omnikv.prefill_stream_bytes` plans both). The price is host->device bytes
of prompt^2 / (2 * chunk) rows per sparse layer; they hide under attention's compute from a chunk
of about F * H_kv * e / (2 * H_q * BW) tokens (docs/how-it-works.md has the figures).
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv.offload.bank import PackedBank
from omnikv.offload.transfer import Transfer


class PrefixStream:
    """Prompt forwards of one offloaded segment: prefixes streamed back, chunks packed for the bank."""

    def __init__(self, bank: PackedBank, transfer: Transfer, device: torch.device, stream: Any) -> None:
        self.bank = bank
        self.transfer = transfer
        self.device = device
        self.stream = stream
        self.fetched: dict[int, tuple[torch.Tensor, Any]] = {}  # slot -> ((2, B, H, start + n, D), event)
        self.chunk: torch.Tensor | None = None  # (n, B, L, 2, H, D): this chunk's rows, every layer

    def prefetch(self, slot: int, start: int, n: int) -> None:
        """Start reading layer `slot`'s rows 0..start back from the bank (side stream), into a
        buffer with room for the n rows of the chunk that follows. Nothing to read at start 0."""
        if start == 0 or slot in self.fetched or slot >= self.bank.num_layers or self.bank.data is None:
            return
        t, bank = self.transfer, self.bank
        _, b, _, _, h, d = bank.data.shape
        buf = t.device_empty((2, b, h, start + n, d), bank.data.dtype, self.device)
        src = bank.gather_source(self.device)  # mapped host memory on CUDA: a device kernel reads it
        prefix = buf[:, :, :, :start]
        t.after_compute(self.stream, self.device)  # `buf` may reuse memory the compute stream freed

        def read() -> None:
            prefix.copy_(src[:start, :, slot].permute(2, 1, 3, 0, 4))  # (start, B, 2, H, D) -> (2, B, H, start, D)

        t.launch(self.stream, read, writes=(prefix,))
        t.keep_alive(buf, self.stream)
        t.count(h2d=prefix.numel() * prefix.element_size())
        self.fetched[slot] = (buf, t.record(self.stream, self.device))

    def write(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `slot`'s chunk (B, H, n, D) at rows start..start+n; returns every row so far,
        (B, H, start + n, D) each. Starts the next layer's read; after the last layer, the chunk
        goes to the bank."""
        n = key.shape[-2]
        if start == 0:
            attended = key, value
        else:
            self.prefetch(slot, start, n)  # not started ahead (a direct call, or a new segment)
            buf, ready = self.fetched.pop(slot)
            # Waiting first also lets the previous chunk's copy to the bank finish (it was issued
            # before this read) before a new pack buffer is taken: one pack buffer at a time.
            self.transfer.wait(ready, self.device)
            buf[0, :, :, start:].copy_(key)
            buf[1, :, :, start:].copy_(value)
            attended = buf[0], buf[1]
        self._pack(slot, key, value)
        self.prefetch(slot + 1, start, n)
        if slot == self.bank.num_layers - 1:
            self._send(start, start + n)
        return attended

    def _pack(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Layer `slot`'s chunk rows into the token-major pack buffer (a device copy)."""
        b, h, n, d = key.shape
        if self.chunk is None or self.chunk.shape[0] != n:
            shape = (n, b, self.bank.num_layers, 2, h, d)
            self.chunk = self.transfer.device_empty(shape, key.dtype, self.device)
        self.chunk[:, :, slot, 0].copy_(key.permute(2, 0, 1, 3))
        self.chunk[:, :, slot, 1].copy_(value.permute(2, 0, 1, 3))

    def _send(self, start: int, end: int) -> None:
        """The complete chunk (every layer written) to bank rows start..end in one contiguous copy
        on the side stream; the pack buffer is dropped here (the side stream keeps it until the
        copy is done)."""
        t, bank, chunk = self.transfer, self.bank, self.chunk
        _, b, _, _, h, d = chunk.shape
        bank.ensure(end, b, h, d, chunk.dtype, t.record(self.stream, self.device))
        t.after_compute(self.stream, self.device)  # the rows the compute stream packed are ready
        t.copy(self.stream, bank.data[start:end], chunk)
        t.keep_alive(chunk, self.stream)
        bank.written = t.record(self.stream, self.device)
        bank.length = end
        self.chunk = None
        self.fetched.clear()  # reads started for a chunk that will not come

    def device_bytes(self) -> int:
        """Device bytes held between layers: prefixes read ahead and the pack buffer."""
        held = [buf for buf, _ in self.fetched.values()] + ([self.chunk] if self.chunk is not None else [])
        return sum(x.numel() * x.element_size() for x in held)
