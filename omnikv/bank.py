"""The Context Bank of a segment: every row of its sparse layers, and the packed load of the
selected rows into the device working buffer (see docs/how-it-works.md)."""

from __future__ import annotations

import math

import torch

from omnikv._compat import is_cuda
from omnikv.buffers import GROWTH, grown_capacity
from omnikv.selection import gather_rows, selection_delta


class PackedBank:
    """The Context Bank of one segment: the KV rows of several layers in one tensor.

    Storage is (L, 2, B, H, capacity, D): layer slot, key/value, batch, KV head, token, head dim.
    Packing the layers lets one `index_select` gather the selected rows of every sparse layer of a
    segment at once, and one contiguous staging buffer feed the host->device copies. On a CUDA
    machine with offload the storage is pinned host memory, so copies can run asynchronously.
    """

    def __init__(self, num_layers: int, device: torch.device, pin: bool, headroom: int = 256) -> None:
        self.num_layers = num_layers
        self.device = device
        self.pin = pin
        self.headroom = headroom
        self.data: torch.Tensor | None = None
        self.length = [0] * num_layers

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[-2]

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pin)

    def write(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append (B, H, n, D) rows to layer `slot` (copied to the bank's device)."""
        n = key.shape[-2]
        end = self.length[slot] + n
        if self.data is None or end > self.capacity:
            b, h, _, d = key.shape
            cap = grown_capacity(end, self.capacity, self.headroom)
            data = self._alloc((self.num_layers, 2, b, h, cap, d), key.dtype)
            if self.data is not None:
                if self.pin and torch.cuda.is_available():
                    # Rows may still be arriving by non-blocking device->host copies.
                    torch.cuda.current_stream().synchronize()
                used = max(self.length)
                data[..., :used, :].copy_(self.data[..., :used, :])
            self.data = data
        start = self.length[slot]
        non_blocking = self.pin
        self.data[slot, 0, :, :, start:end].copy_(key, non_blocking=non_blocking)
        self.data[slot, 1, :, :, start:end].copy_(value, non_blocking=non_blocking)
        self.length[slot] = end

    def read(self, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer `slot`'s first `end` rows, (B, H, end, D) each, on the bank's device."""
        return self.data[slot, 0, :, :, :end], self.data[slot, 1, :, :, :end]

    def used_bytes(self) -> int:
        if self.data is None:
            return 0
        row = self.data[0, 0, :, :, :1].numel() * self.data.element_size()
        return 2 * row * sum(self.length)

    def allocated_bytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class Segment:
    """The sparse layers that follow one filter layer, with their packed Context Bank.

    Bank: (L, 2, B, H, capacity, D) on the host when offloading (pinned on CUDA), else on the
    device. Working buffer: (L, 2, B, H, k + gen_capacity, D) on the compute device; the first k
    rows of every layer are the current selection, then that layer's generated tokens. One
    `index_select` over the flattened bank fills the selection of all L layers at once; on CUDA the
    host->device copy of the packed rows runs on a side stream and the layers wait on its event.
    """

    def __init__(self, filter_layer: int, layers: list[int], offload: bool, partial_reload: bool = True) -> None:
        self.filter_layer = filter_layer
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.offload = offload
        self.partial_reload = partial_reload
        self.bank: PackedBank | None = None
        self.device: torch.device | None = None
        self.indices: torch.Tensor | None = None  # (B, G, k) current selection
        self.loaded_step: int | None = None
        self.h2d_bytes = 0
        self.partial_loads = 0  # loads that moved only the changed rows (telemetry / tests)
        self.work: torch.Tensor | None = None
        self.k = 0
        self.generated = 0
        self.staging: torch.Tensor | None = None  # pinned flat buffer for (L, 2, B, H, k, D), CUDA offload only
        self.scratch: torch.Tensor | None = None  # flat buffer a partial reload's rows pass through
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
        """Make the working buffer hold rows `idx` (B, G, k) of every sparse layer of the segment,
        in one packed operation.

        When the buffer already holds a selection of the same size, only the rows that changed
        need to move (see `selection_delta`); `self.indices` then lists the positions in slot
        order, a permutation of `idx`. A partial reload moves its rows twice (gather into scratch,
        then scatter into the slots), so on one CPU it is used only when at most half of the rows
        changed; across the host->device link, where the transfer dominates, whenever anything was
        kept; never when bank and buffer share one GPU.
        """
        k = idx.shape[-1]
        prev = self.indices if self.indices is not None and self.indices.shape == idx.shape else None
        self._ensure_work(k, self.generated)
        self.k = k
        self.loaded_step = step
        dst = self.work[..., :k, :]  # (L, 2, B, H, k, D)
        slots, tokens = None, idx
        # Not on one GPU: sizing the reload reads a count back to the host (a stream sync), which
        # costs more there than a device gather of all k rows.
        worth_it = self.copy_stream is not None or not is_cuda(dst.device)
        if prev is not None and self.partial_reload and worth_it:
            delta = selection_delta(prev, idx, self.bank.capacity)
            m = delta[0].shape[-1]
            if m < k and (self.copy_stream is not None or 2 * m <= k):
                slots, tokens = delta
                idx = prev.scatter(-1, slots, tokens)
                self.partial_loads += 1
        self.indices = idx
        m = tokens.shape[-1]
        if self.copy_stream is None:  # bank and work on the same device: gather in place
            if slots is None:
                _gather_into(self.bank, tokens, dst)
            elif m:
                rows = self._scratch(dst, m, self.bank.data.device)
                _gather_into(self.bank, tokens, rows)
                _scatter_rows(dst, slots, rows)
            self.h2d_bytes = 0
            return
        # CUDA + offload: gather on the host into pinned staging, then one async packed copy (and,
        # for a partial reload, a scatter into the slots) on the side stream.
        if self.ready is not None:
            self.ready.synchronize()  # the previous copy must be done before staging is reused
        staging = self._staging(dst, m)
        _gather_into(self.bank, tokens.cpu(), staging)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            if slots is None:
                dst.copy_(staging, non_blocking=True)
            elif m:
                rows = self._scratch(dst, m, dst.device)
                rows.copy_(staging, non_blocking=True)
                # `slots` was made on the compute stream and dies with this call: keep the caching
                # allocator from handing its memory out before the side stream has used it.
                slots.record_stream(self.copy_stream)
                _scatter_rows(dst, slots, rows)
            self.ready = torch.cuda.Event()
            self.ready.record(self.copy_stream)
        self.h2d_bytes = staging.numel() * staging.element_size()

    def _staging(self, like: torch.Tensor, m: int) -> torch.Tensor:
        """Pinned (L, 2, B, H, m, D), contiguous: the front of one buffer sized for a full load."""
        if self.staging is None or self.staging.numel() < like.numel():
            self.staging = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
        return _front(self.staging, like.shape, m)

    def _scratch(self, like: torch.Tensor, m: int, device: torch.device) -> torch.Tensor:
        """(L, 2, B, H, m, D) on `device` that a partial reload's rows pass through. Reused (a
        fresh tensor per step would page-fault its way in) and sized for the changes seen so far
        (x1.5, at most a full load), not for all k rows: on CUDA it is device memory."""
        need = like.numel() // like.shape[-2] * m
        if self.scratch is None or self.scratch.numel() < need or self.scratch.device != device:
            size = min(max(need + need // 2, 1), like.numel())
            self.scratch = torch.empty(size, dtype=like.dtype, device=device)
        return _front(self.scratch, like.shape, m)

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


def _scatter_rows(dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """dst (L, 2, B, H, k, D)[..., slots, :] <- rows (L, 2, B, H, M, D); slots (B, G, M)."""
    b, g, m = slots.shape
    if b == 1 and g == 1:
        dst.index_copy_(dst.dim() - 2, slots[0, 0], rows)
        return
    lsz, two, _, h, _, d = rows.shape
    index = slots.view(1, 1, b, g, m, 1).expand(lsz, two, b, h, m, d)
    dst.scatter_(dst.dim() - 2, index, rows)


def _front(flat: torch.Tensor, shape: torch.Size, m: int) -> torch.Tensor:
    """The first elements of a flat buffer viewed as `shape` with its token axis (-2) set to m."""
    shape = (*shape[:-2], m, shape[-1])
    return flat[: math.prod(shape)].view(shape)
