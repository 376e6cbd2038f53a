"""The Context Bank of a segment: every row of its sparse layers, and the packed load of the
selected rows into the device working buffer (see docs/how-it-works.md)."""

from __future__ import annotations

import torch

from omnikv._compat import is_cuda
from omnikv.selection import gather_rows
from omnikv.storage import GROWTH, PackedBank


class Segment:
    """The sparse layers that follow one filter layer, with their packed Context Bank.

    Bank: (L, 2, B, H, capacity, D) on the host when offloading (pinned on CUDA), else on the
    device. Working buffer: (L, 2, B, H, k + gen_capacity, D) on the compute device; the first k
    rows of every layer are the current selection, then that layer's generated tokens. One
    `index_select` over the flattened bank fills the selection of all L layers at once; on CUDA the
    host->device copy of the packed rows runs on a side stream and the layers wait on its event.
    """

    def __init__(self, filter_layer: int, layers: list[int], offload: bool) -> None:
        self.filter_layer = filter_layer
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.offload = offload
        self.bank: PackedBank | None = None
        self.device: torch.device | None = None
        self.indices: torch.Tensor | None = None  # (B, G, k) current selection
        self.loaded_step: int | None = None
        self.h2d_bytes = 0
        self.work: torch.Tensor | None = None
        self.k = 0
        self.generated = 0
        self.staging: torch.Tensor | None = None  # pinned (L, 2, B, H, k, D), CUDA offload only
        self.copy_stream = None
        self.ready = None  # CUDA event: the packed copy has landed

    def attach(self, like: torch.Tensor) -> None:
        """Called by each sparse layer's first update: allocate the bank, check devices."""
        if self.device is None:
            self.device = like.device
            host = self.offload and is_cuda(like.device)
            bank_device = torch.device("cpu") if self.offload else like.device
            self.bank = PackedBank(len(self.layers), bank_device, pin=host)
            if host:
                self.copy_stream = torch.cuda.Stream(like.device)
        # With accelerate's device_map a segment may span devices: the packed working buffer lives
        # on the first sparse layer's device and the others read their rows across (one extra copy).

    def reset_decode(self) -> None:
        self.indices = None
        self.loaded_step = None
        self.work = None
        self.k = 0
        self.generated = 0

    def _ensure_work(self, k: int, generated: int) -> None:
        """Room for k selected + `generated` rows. Growing keeps what is already there: the
        selected rows too when k is unchanged (a load may have just filled them this step)."""
        data = self.bank.data
        need = k + generated
        if self.work is not None and self.k == k and self.work.shape[-2] >= need:
            return
        lsz, two, b, h, _, d = data.shape
        cap = need + 64 if self.work is None else max(need + 64, int(need * GROWTH))
        work = torch.empty((lsz, two, b, h, cap, d), dtype=data.dtype, device=self.device)
        if self.work is not None:
            if self.ready is not None:  # a pending async load still writes the old buffer
                torch.cuda.current_stream(self.device).wait_event(self.ready)
            if self.k == k:
                work[..., : k + self.generated, :].copy_(self.work[..., : k + self.generated, :])
            elif self.generated:
                work[..., k : k + self.generated, :].copy_(self.work[..., self.k : self.k + self.generated, :])
        self.work = work

    def load(self, idx: torch.Tensor, step: int) -> None:
        """Gather rows `idx` (B, G, k) of every sparse layer of the segment into the working
        buffer, in one packed operation."""
        k = idx.shape[-1]
        self._ensure_work(k, self.generated)
        self.k = k
        self.indices = idx
        self.loaded_step = step
        bank = self.bank
        dst = self.work[..., :k, :]
        if self.copy_stream is None:  # bank and work on the same device: gather in place
            _gather_into(bank, idx, dst)
            self.h2d_bytes = 0
            return
        # CUDA + offload: gather on the host into pinned staging, then one async packed copy.
        if self.ready is not None:
            self.ready.synchronize()  # the previous copy must be done before staging is reused
        shape = dst.shape
        if self.staging is None or self.staging.shape != shape:
            self.staging = torch.empty(shape, dtype=dst.dtype, pin_memory=True)
        _gather_into(bank, idx.cpu(), self.staging)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(self.staging, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.copy_stream)
        self.h2d_bytes = self.staging.numel() * self.staging.element_size()

    def wait_ready(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)

    def host_bytes(self) -> int:
        if self.bank is None or not self.offload:
            return 0
        return self.bank.used_bytes()

    def device_bytes(self) -> int:
        used = 0
        if self.work is not None:
            row = self.work[0, 0, :, :, :1].numel() * self.work.element_size()
            used += 2 * row * len(self.layers) * (self.k + self.generated)
        if self.bank is not None and not self.offload:
            used += self.bank.used_bytes()
        return used


def _gather_into(bank: PackedBank, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out (L, 2, B, H, k, D) <- bank rows idx (B, G, k)."""
    data = bank.data
    b, g, k = idx.shape
    if b == 1 and g == 1:
        # One index_select over all (layer, k/v, head) rows at once, written in place.
        lsz, two, _, h, cap, d = data.shape
        src = data.view(lsz * two * h, cap, d)
        dst = out.squeeze(2).view(lsz * two * h, k, d)  # a view (raises rather than copy)
        torch.index_select(src, 1, idx[0, 0].to(data.device), out=dst)
        return
    out.copy_(gather_rows(data, idx.to(data.device)))
