"""The Context Bank of a segment: every prompt row of its sparse layers, and the packed load of the
selected rows into the device working buffer (see docs/how-it-works.md, "Transfers").

Layouts (L sparse layers in the segment, B batch, H KV heads, D head dim):

* bank  (capacity, B, L, 2, H, D), token-major: one token's K and V of every layer of the segment
  and every sequence of the batch are one contiguous block, so a prompt chunk is one contiguous
  host<->device copy and a gathered token is one contiguous read;
* work  (L, 2, B, H, k + decode capacity, D) on the compute device, layer-major as attention wants
  it: the first k rows of each layer are the current selection, then that layer's generated tokens.

Generated tokens never leave the device during a decode run: they are attended from `work` and
reach the bank in one copy when a later multi-token forward makes them part of the prompt. Every
copy, stream and event goes through the cache's `Transfer` (omnikv/offload/transfer.py).
"""

from __future__ import annotations

import functools

import torch

from omnikv.hf.buffers import KVBuffer, grown_capacity
from omnikv.errors import ConfigError
from omnikv.hf.static import mark_static
from omnikv.offload.delta import selection_delta
from omnikv.offload.transfer import Transfer

_FLUSH_BLOCK = 4096  # tokens per packed device->host copy when prompt rows move to the bank


class PackedBank:
    """Token-major storage (capacity, B, L, 2, H, D) of one segment's prompt rows.

    Sized once by `reserve` (exactly: no power-of-two pinned blocks, no growth in a request that
    announced its length); grows by x1.5 only when a caller did not say how long it would be.
    """

    def __init__(self, num_layers: int, transfer: Transfer, device: torch.device) -> None:
        self.num_layers = num_layers
        self.transfer = transfer
        self.device = device  # where the rows live: the host when offloading
        self.data: torch.Tensor | None = None
        self.length = 0  # rows in use (every layer of the segment has written them)
        self.reserved = 0
        self.source: torch.Tensor | None = None  # what the gather kernel reads (a mapped view on CUDA)

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[0]

    def ensure(self, rows: int, b: int, h: int, d: int, dtype: torch.dtype, pending=None) -> None:
        """Room for `rows` rows; `pending` = an event after which every side-stream use of the bank
        (copies into it, gathers from it) is done: growing frees the old storage, so the host
        waits for it (only when a request did not announce its length with `reserve`)."""
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
        if self.source is None:
            self.source = self.transfer.gather_source(self.data, compute_device)
        return self.source

    def layer_view(self, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `slot`'s first `end` rows as (B, H, end, D) views (strided) of the bank."""
        rows = self.data[:end, :, slot]  # (end, B, 2, H, D)
        return rows[:, :, 0].permute(1, 2, 0, 3), rows[:, :, 1].permute(1, 2, 0, 3)

    def used_bytes(self) -> int:
        if self.data is None:
            return 0
        return self.length * self.data[0].numel() * self.data.element_size()

    def allocated_bytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class Segment:
    """The sparse layers that follow one filter layer (on one device), with their packed bank.

    Offloading, a prompt forward keeps each sparse layer's prefix on the device (`prefix`, so a
    chunked prefill reads nothing back) and sends each chunk's rows to the host bank in one packed
    asynchronous copy; the prefix buffers are dropped when decoding starts. Not offloading, the bank
    is on the compute device and prompt forwards attend from views of it.
    """

    def __init__(self, filter_layer: int, layers: list[int], offload: bool, partial_reload: bool = True,
                 transfer: Transfer | None = None) -> None:
        self.filter_layer = filter_layer
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.offload = offload  # the rows live in host memory (accounting, the bank's device)
        self.transfer = transfer or Transfer()
        # A host<->device link to manage (CUDA, or its simulation). Offloading on a CPU-only run
        # keeps the bank in the same memory: the inline mechanics, the offload accounting.
        self.link = offload and self.transfer.offloads
        self.partial_reload = partial_reload
        self.bank: PackedBank | None = None
        self.device: torch.device | None = None
        self.indices: torch.Tensor | None = None  # (B, G, k) positions in slot order
        self.loaded_step: int | None = None
        self.h2d_bytes = 0  # of the last load
        self.partial_loads = 0  # loads that moved only the changed rows (telemetry / tests)
        self.work: torch.Tensor | None = None
        self.k = 0
        self.generated = 0
        self.decode_reserve = 0  # generated rows `work` is sized for (from `reserve`)
        self.prefix: list[KVBuffer] | None = None  # offload: device copies of the prompt rows
        self.staging: torch.Tensor | None = None  # host_gather: page-locked (m, B, L, 2, H, D)
        self.pack: torch.Tensor | None = None  # device (n, B, L, 2, H, D) a copy to the bank packs into
        self.ready = None  # event: the last load has landed in `work`
        self.written = None  # event: the last rows sent to the bank have landed
        self.stream = None
        self._host_indices: torch.Tensor | None = None  # host_gather: `indices` on the host
        self._reserved_total = 0
        # Static decode (omnikv/hf/static.py): the bank rows a load gathers from, and the logical
        # positions (1, 1, decode capacity) of the generated-token slots of `work`.
        self._static_source: torch.Tensor | None = None
        self._static_gen_positions: torch.Tensor | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def attach(self, like: torch.Tensor) -> None:
        """Called by each sparse layer's first update (B, H, n, D): allocate, check devices."""
        if self.device is None:
            self.device = like.device
            bank_device = torch.device("cpu") if self.offload else like.device
            self.bank = PackedBank(len(self.layers), self.transfer, bank_device)
            self.stream = self.transfer.side_stream(like.device) if self.link else None

    def reserve(self, total_rows: int, decode_rows: int) -> None:
        """Size the bank for `total_rows` prompt rows and `work` for `decode_rows` generated ones."""
        self.decode_reserve = max(self.decode_reserve, decode_rows)
        if self.bank is not None:
            self.bank.reserved = max(self.bank.reserved, total_rows)
        self._reserved_total = max(self._reserved_total, total_rows)

    def _geometry(self, like: torch.Tensor) -> tuple[int, int, int]:
        b, h, _, d = like.shape
        return b, h, d

    # -- prompt forwards ----------------------------------------------------------------------------
    def begin_prompt(self) -> None:
        """A multi-token forward starts: generated rows join the prompt (moved to the bank), and
        when offloading the prefix comes back to the device for the prompt's full attention."""
        if self.bank is None or self.bank.data is None:
            self._reset_decode()
            return
        if self.generated:
            self._flush_generated()
        if self.link and self.prefix is None and self.bank.length:
            self._restore_prefix()
        self._reset_decode()

    def write_prompt(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..start+n of layer `slot` from a prompt forward (B, H, n, D); returns what that
        layer attends to: every row so far, (B, H, start + n, D)."""
        n = key.shape[-2]
        b, h, d = self._geometry(key)
        bank, end = self.bank, start + n
        reserved = max(self._reserved_total, end)
        if self.link:
            if self.prefix is None:
                self.prefix = [KVBuffer(headroom=0) for _ in self.layers]
            buf = self.prefix[slot]
            buf.reserve(max(reserved, end), key)
            k_all, v_all = buf.append(key, value)
            if slot == len(self.layers) - 1:  # the segment's last layer: the chunk is complete
                bank.reserved = max(bank.reserved, reserved)
                bank.ensure(end, b, h, d, key.dtype, self._side_done())
                self._send_to_bank(start, end, self._prefix_packer())
                bank.length = end
            return k_all, v_all
        bank.reserved = max(bank.reserved, reserved)
        bank.ensure(end, b, h, d, key.dtype)
        rows = bank.data[start:end, :, slot]  # (n, B, 2, H, D)
        rows[:, :, 0].copy_(key.permute(2, 0, 1, 3))
        rows[:, :, 1].copy_(value.permute(2, 0, 1, 3))
        if slot == len(self.layers) - 1:
            bank.length = end
        if start == 0:
            return key, value
        return bank.layer_view(slot, end)

    def _prefix_packer(self):
        """A packer over the current prefix buffers (captured now: the side stream may run it
        after `begin_decode` dropped them)."""
        prefix = list(self.prefix)

        def packer(lo: int, hi: int, out: torch.Tensor) -> None:
            for s, buf in enumerate(prefix):
                out[:, :, s, 0].copy_(buf.keys[:, :, lo:hi].permute(2, 0, 1, 3))
                out[:, :, s, 1].copy_(buf.values[:, :, lo:hi].permute(2, 0, 1, 3))

        for buf in prefix:  # read on the side stream: keep their memory until it is done
            self.transfer.keep_alive(buf.keys, self.stream)
            self.transfer.keep_alive(buf.values, self.stream)
        return packer

    def _pack_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        b, h, _, d = like.shape
        row = b * len(self.layers) * 2 * h * d
        if self.pack is None or self.pack.numel() < n * row:
            self.pack = torch.empty(max(n, 1) * row, dtype=like.dtype, device=like.device)
        return self.pack[: n * row].view(n, b, len(self.layers), 2, h, d)

    def _send_to_bank(self, start: int, end: int, packer) -> None:
        """Rows start..end to the host bank: packed on the device and copied in blocks of at most
        `_FLUSH_BLOCK` tokens, all on the side stream (the compute stream does not wait).
        `packer(lo, hi, out)` fills `out` (hi - lo, B, L, 2, H, D) on the device."""
        t = self.transfer
        t.after_compute(self.stream, self.device)  # the rows the compute stream wrote are ready
        pack = self._pack_buffer(min(_FLUSH_BLOCK, end - start), self._like())
        for lo in range(start, end, _FLUSH_BLOCK):
            hi = min(lo + _FLUSH_BLOCK, end)
            out = pack[: hi - lo]
            # Packing runs on the side stream: blocks reuse `pack` in stream order.
            t.launch(self.stream, lambda lo=lo, hi=hi, out=out: packer(lo, hi, out), writes=(out,))
            t.copy(self.stream, self.bank.data[lo:hi], out)
        t.keep_alive(pack, self.stream)
        self.written = t.record(self.stream, self.device)

    def _side_done(self):
        """An event after all work issued so far on the side stream (None without a link)."""
        return self.transfer.record(self.stream, self.device) if self.link else None

    def _like(self) -> torch.Tensor:
        if self.prefix is not None and self.prefix[0].keys is not None:
            return self.prefix[0].keys
        return self.work[0, 0]

    def _flush_generated(self) -> None:
        """The generated rows (in `work`) become prompt rows: append them to the bank."""
        bank, g, k = self.bank, self.generated, self.k
        start, end = bank.length, bank.length + g
        lsz, _, b, h, _, d = self.work.shape
        bank.ensure(end, b, h, d, self.work.dtype, self._side_done())
        work = self.work
        self.transfer.wait(self.ready, self.device)

        def packer(lo: int, hi: int, out: torch.Tensor) -> None:
            out.copy_(work[..., k + lo - start : k + hi - start, :].permute(4, 2, 0, 1, 3, 5))

        if self.link:
            self.transfer.keep_alive(work, self.stream)
            self._send_to_bank(start, end, packer)
        else:
            bank.data[start:end].copy_(work[..., k : k + g, :].permute(4, 2, 0, 1, 3, 5))
        bank.length = end

    def _restore_prefix(self) -> None:
        """Offload, a new prompt forward after decoding: the bank's rows back on the device once
        (O(prompt) bytes per turn), as layer-major prefix buffers, in blocks of `_FLUSH_BLOCK`
        tokens (one contiguous copy each) so that no second full copy is ever on the device."""
        bank, t = self.bank, self.transfer
        n = bank.length
        _, b, lsz, _, h, d = bank.data.shape
        like = torch.empty((b, h, 0, d), dtype=bank.data.dtype, device=self.device)
        self.prefix = [KVBuffer(headroom=0) for _ in self.layers]
        for buf in self.prefix:
            buf.reserve(max(self._reserved_total, n), like)
        t.after_compute(self.stream, self.device)
        for lo in range(0, n, _FLUSH_BLOCK):
            hi = min(lo + _FLUSH_BLOCK, n)
            staged = torch.empty((hi - lo, b, lsz, 2, h, d), dtype=bank.data.dtype, device=self.device)
            t.copy(self.stream, staged, bank.data[lo:hi])
            t.wait(t.record(self.stream, self.device), self.device)  # device-side: the host goes on
            t.keep_alive(staged, self.stream)
            for s, buf in enumerate(self.prefix):
                buf.append(staged[:, :, s, 0].permute(1, 2, 0, 3), staged[:, :, s, 1].permute(1, 2, 0, 3))

    # -- decode -------------------------------------------------------------------------------------
    def begin_decode(self) -> None:
        """The first decode step after a prompt: the device prefix is no longer needed."""
        if self.prefix is not None:
            self.prefix = None  # its memory is kept alive for the side stream by keep_alive
            self.pack = None  # so is the pack buffer's (~16 MiB per sparse layer, not KV: not counted)

    def _reset_decode(self) -> None:
        self.indices = None
        self.loaded_step = None
        self.work = None
        self.k = 0
        self.generated = 0
        self.ready = None

    def reset_decode(self) -> None:  # kept for callers that start over (tests, bench)
        self.begin_prompt()

    def _ensure_work(self, k: int, generated: int) -> None:
        """Room for k selected + `generated` rows. Growing keeps what is there; only when a request
        did not announce its length (`reserve`) does this reallocate during decoding."""
        need = k + generated
        if self.work is not None and self.k == k and self.work.shape[-2] >= need:
            return
        _, b, lsz, _, h, d = self.bank.data.shape
        if self.work is None:
            cap = k + max(self.decode_reserve, generated, 1)
        else:
            cap = grown_capacity(need, self.work.shape[-2], 64)
        work = torch.empty((lsz, 2, b, h, cap, d), dtype=self.bank.data.dtype, device=self.device)
        if self.work is not None:
            self.transfer.wait(self.ready, self.device)  # a pending load still writes the old buffer
            if self.k == k:
                work[..., : k + self.generated, :].copy_(self.work[..., : k + self.generated, :])
            elif self.generated:
                work[..., k : k + self.generated, :].copy_(self.work[..., self.k : self.k + self.generated, :])
        self.work = work

    def load(self, idx: torch.Tensor, step: int) -> None:
        """Make `work` hold rows `idx` (B, G, k) of every sparse layer of the segment, in one packed
        operation (see the module docstring and docs/how-it-works.md for the strategies)."""
        self.begin_decode()
        idx = idx.to(self.device, non_blocking=True)
        k = idx.shape[-1]
        prev = self.indices if self.indices is not None and self.indices.shape == idx.shape else None
        self._ensure_work(k, self.generated)
        self.k, self.loaded_step = k, step
        dst = self.work[..., :k, :]  # (L, 2, B, H, k, D)
        t = self.transfer
        if not self.link:
            self._load_inline(idx, prev, dst)
            return
        # Asking for the gather source settles the strategy (a CUDA driver that cannot map host
        # memory switches the transfer to the host gather).
        src = self.bank.gather_source(self.device)
        if t.gather == "host_gather":
            self._load_via_host(idx, prev, dst)
        else:
            self._load_on_device(idx, dst, src[: self.bank.length])

    def _load_inline(self, idx: torch.Tensor, prev: torch.Tensor | None, dst: torch.Tensor) -> None:
        """Bank and work on one device: gather in place. A partial reload moves its rows twice
        (gather, then scatter), so it is used only when at most half of the rows changed, and not
        on a GPU, where sizing it reads a count back to the host."""
        self.h2d_bytes = 0
        data = self.bank.data[: self.bank.length]
        if prev is not None and self.partial_reload and dst.device.type == "cpu":
            slots, tokens = selection_delta(prev, idx, self.bank.length)
            m = tokens.shape[-1]
            if m < idx.shape[-1] and 2 * m <= idx.shape[-1]:
                self.indices = prev.scatter(-1, slots, tokens)
                self.partial_loads += 1
                if m:
                    scatter_rows(dst, slots, to_work_layout(gather_packed(data, tokens)))
                return
        self.indices = idx
        gather_into(data, idx, dst)

    def _load_on_device(self, idx: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Offload, device_gather: the GPU reads the selected rows straight from the mapped host
        bank with device indices, on the side stream; nothing waits on the host. Each selected
        token is one contiguous read of L * 2 * H * D elements; a device copy then lays the rows
        out per layer. Every load moves all k rows: sizing a partial reload would need the count
        of changed rows on the host (a sync)."""
        t = self.transfer
        t.after_compute(self.stream, self.device)  # the indices (and bank writes) are ready

        def gather():
            dst.copy_(to_work_layout(gather_packed(src, idx)))

        t.launch(self.stream, gather, writes=(dst,))
        t.keep_alive(idx, self.stream)
        self.indices = idx
        self.h2d_bytes = idx.shape[0] * idx.shape[-1] * self._row_bytes()
        t.count(h2d=self.h2d_bytes)
        self.ready = t.record(self.stream, self.device)

    def _load_via_host(self, idx: torch.Tensor, prev: torch.Tensor | None, dst: torch.Tensor) -> None:
        """Offload, host_gather: the indices come to the host (one counted sync), the host gathers
        the rows that changed into page-locked staging, one contiguous copy moves them and the
        side stream scatters them into their slots."""
        t, bank = self.transfer, self.bank
        t.host_wait(self.written, "host gather: prompt rows still arriving in the bank")
        host_idx = t.to_host(idx, "host gather: selected indices to the host")
        host_prev = self._host_indices if prev is not None else None
        slots, tokens = None, host_idx
        if host_prev is not None and self.partial_reload:
            s, tok = selection_delta(host_prev, host_idx, bank.length)
            if tok.shape[-1] < host_idx.shape[-1]:
                slots, tokens = s, tok
                self.partial_loads += 1
        self._host_indices = host_idx if slots is None else host_prev.scatter(-1, slots, tokens)
        self.indices = self._host_indices.to(self.device, non_blocking=True)
        m = tokens.shape[-1]
        if m == 0:
            self.h2d_bytes = 0
            return
        t.host_wait(self.ready, "host gather: staging still being copied")  # staging is reused
        rows = self._staging(m, tokens.shape[1], dst.dtype)
        rows.copy_(gather_packed(bank.data[: bank.length], tokens))
        landed = torch.empty(rows.shape, dtype=rows.dtype, device=self.device)
        t.after_compute(self.stream, self.device)
        t.copy(self.stream, landed, rows)
        dev_slots = None if slots is None else slots.to(self.device, non_blocking=True)

        def place():
            if dev_slots is None:
                dst.copy_(to_work_layout(landed))
            else:
                scatter_rows(dst, dev_slots, to_work_layout(landed))

        t.launch(self.stream, place, writes=(dst,) if slots is None else ())
        t.keep_alive(landed, self.stream)
        self.h2d_bytes = rows.numel() * rows.element_size()
        self.ready = t.record(self.stream, self.device)

    def _staging(self, m: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """Page-locked (M, B, L, 2, H, D) (G = 1) or (M, B, L, 2, H, D) per-head rows (G = H),
        the front of one buffer sized for a full load of the working buffer's rows."""
        _, b, lsz, _, h, d = self.bank.data.shape
        row = b * lsz * 2 * h * d
        if self.staging is None or self.staging.numel() < m * row:
            self.staging = self.transfer.host_empty((max(m, self.k) * row,), dtype, torch.device("cpu"))
        return self.staging[: m * row].view(m, b, lsz, 2, h, d)

    def _row_bytes(self) -> int:
        """Bytes of one token of one sequence across the segment: L * 2 * H * D elements."""
        _, _, lsz, _, h, d = self.bank.data.shape
        return lsz * 2 * h * d * self.bank.data.element_size()

    def wait_ready(self) -> None:
        self.transfer.wait(self.ready, self.device)

    # -- generated rows -----------------------------------------------------------------------------
    def append_generated(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode token's (B, H, 1, D) K/V of layer `slot`; returns the rows it attends to,
        (B, H, k + generated, D): the selection, then every generated token."""
        if slot == 0:
            self._ensure_work(self.k, self.generated + 1)
            self.generated += 1
        pos = self.k + self.generated - 1
        self.work[slot, 0, :, :, pos : pos + 1].copy_(key)
        self.work[slot, 1, :, :, pos : pos + 1].copy_(value)
        self.wait_ready()
        n = self.k + self.generated
        return self.work[slot, 0, :, :, :n], self.work[slot, 1, :, :, :n]

    # -- static decode (omnikv/hf/static.py) -----------------------------------------------------------
    def begin_static(self, k: int, decode_rows: int) -> None:
        """Outside compiled code, before the first static step after a prompt: `work` sized
        exactly k + `decode_rows` and zeroed, the bank complete on the compute stream, the gather
        source fixed. Every later step has the same shapes."""
        if self.link and self.transfer.gather == "host_gather":
            raise ConfigError(
                "static / compile decoding gathers on the device; the host_gather transfer reads "
                "the indices on the host every step. Use transfer='cuda_device_gather' (or 'simulated')"
            )
        self.begin_decode()
        self.transfer.wait(self.written, self.device)  # prompt rows still arriving in the bank
        bank = self.bank
        _, b, lsz, _, h, d = bank.data.shape
        self.work = torch.zeros((lsz, 2, b, h, k + decode_rows, d), dtype=bank.data.dtype, device=self.device)
        self.k, self.generated, self.indices, self.ready = k, 0, None, None
        src = bank.gather_source(self.device) if self.link else bank.data
        if self.link and self.transfer.gather == "host_gather":  # the mapping failed just now
            raise ConfigError("static / compile decoding needs a device gather; this device cannot map host memory")
        self._static_source = src[: bank.length]
        self._static_gen_positions = (bank.length + torch.arange(decode_rows, device=self.device)).view(1, 1, -1)
        # Index tensors for writes into `work` itself, never into a view of it: traced, a write
        # into a view (`work[slot, 0].index_copy_`, `work[..., :k, :].copy_`) is functionalized
        # into a rebuild of the whole `work` tensor per write (profiled: tens of ms a step at 4K),
        # while a write into the graph input is done in place.
        ar = functools.partial(torch.arange, device=self.device)
        self._static_k_rows = ar(k)
        self._static_write_idx = (ar(lsz).view(lsz, 1, 1, 1), ar(2).view(1, 2, 1, 1),
                                  ar(b).view(1, 1, b, 1), ar(h).view(1, 1, 1, h))
        mark_static(self.device, self.work, self._static_source, self._static_gen_positions, self._static_k_rows,
                    *self._static_write_idx)

    def load_static(self, idx: torch.Tensor) -> None:
        """A full gather of rows `idx` (B, G, k) into `work[..., :k, :]`, on the compute stream,
        as tensor operations only (no partial reload: sizing one reads a count on the host)."""
        src = self._static_source
        b, g, _ = idx.shape
        if self.link or b > 1 or g > 1:  # whole-token reads (across the link), then per layer
            rows = to_work_layout(gather_packed(src, idx))
        else:  # `gather_into`'s one pass, without `out=` (dynamo cannot trace a strided out=)
            rows = src.permute(2, 3, 1, 4, 0, 5).index_select(4, idx[0, 0])
        self.work.index_copy_(4, self._static_k_rows, rows)  # into `work` itself: see begin_static
        self.indices = idx

    def append_static(self, slot: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A static step's (B, H, 1, D) K/V of layer `slot`, written at slot k + pos - prompt
        length (`pos` a 0-d device tensor); returns all k + decode-capacity rows (B, H, n, D)."""
        at = (pos - self.bank.length + self.k).view(1, 1, 1, 1)
        layers, kv, batch, heads = self._static_write_idx
        # (1, 2, B, H, D) rows written at [slot, {K, V}, b, h, at] of `work` itself (see begin_static)
        rows = torch.stack([key[:, :, 0], value[:, :, 0]]).unsqueeze(0)
        self.work.index_put_((layers[slot : slot + 1], kv, batch, heads, at), rows)
        return self.work[slot, 0], self.work[slot, 1]

    def static_positions(self) -> torch.Tensor:
        """(B, G, k + decode capacity) logical positions of the rows `append_static` returns."""
        b, g, _ = self.indices.shape
        return torch.cat([self.indices, self._static_gen_positions.expand(b, g, -1)], dim=-1)

    def rows(self, slot: int, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row layer `slot` holds, (B, H, seq_length, D), on the compute device (drop-free
        view for telemetry and tests; waits for pending copies)."""
        self.transfer.host_wait(self.written, "full rows: bank writes still arriving")
        n = min(self.bank.length, seq_length)
        if self.prefix is not None:
            k_p, v_p = self.prefix[slot].view()
        else:
            k_p, v_p = (x.to(self.device) for x in self.bank.layer_view(slot, n))
        g = seq_length - k_p.shape[-2]
        if g <= 0 or self.work is None:
            return k_p[:, :, :seq_length], v_p[:, :, :seq_length]
        self.wait_ready()
        k_g = self.work[slot, 0, :, :, self.k : self.k + g]
        v_g = self.work[slot, 1, :, :, self.k : self.k + g]
        return torch.cat([k_p, k_g], dim=-2), torch.cat([v_p, v_g], dim=-2)

    # -- accounting ---------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        if self.bank is None or not self.offload:
            return 0
        return self.bank.used_bytes()

    def device_bytes(self) -> int:
        used = 0
        if self.work is not None:
            row = self.work[0, 0, :, :, :1].numel() * self.work.element_size()
            used += 2 * row * len(self.layers) * (self.k + self.generated)
        if self.prefix is not None:
            used += sum(buf.used_bytes() for buf in self.prefix)
        if self.bank is not None and not self.offload:
            used += self.bank.used_bytes()
        return used

    def allocated_device_bytes(self) -> int:
        total = 0 if self.work is None else self.work.numel() * self.work.element_size()
        if self.prefix is not None:
            total += sum(buf.allocated_bytes() for buf in self.prefix)
        if self.bank is not None and not self.offload:
            total += self.bank.allocated_bytes()
        return total


# -- gathers over the token-major layout ------------------------------------------------------------
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
