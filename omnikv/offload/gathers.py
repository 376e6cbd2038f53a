"""How the selected rows reach the working buffer: one strategy object per gather, chosen in one
place (`choose_gather`).

| strategy | when | what moves |
|---|---|---|
| `InlineGather` | bank and working buffer on one device (CPU, or offload off) | nothing crosses a link; a partial reload when at most half the rows changed (CPU) |
| `DeviceGather` | offload, the device reads mapped host memory (`Transfer.gather == "device_gather"`) | the changed rows (the reload kernel, omnikv/offload/reload.py, where Triton runs), else all k rows, read by a device kernel on the side stream; no host sync |
| `HostGather` | offload, host memory cannot be mapped (`"host_gather"`) | the changed rows, gathered on the host into pinned staging; one counted sync per load (the indices) |
| `StaticGather` | a static decode run (omnikv/hf/static.py) | with a link and Triton: the changed rows (the reload kernel as a custom op); else all k rows; on the compute stream, no host read |

A strategy's `load(bank, work, idx, prev)` makes the first k rows of `work` hold bank rows `idx`
(B, G, k), sets `work.indices` (the positions in slot order) and `work.ready` (the event after
which they have landed), and returns what it moved (`Load`). A strategy never touches the bank's
prompt rows or the generated rows. See docs/internals.md, "A new transfer strategy".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from omnikv.errors import ConfigError
from omnikv.hf.static import mark_static
from omnikv.offload.bank import PackedBank, StaticWork, WorkBuffer
from omnikv.offload.delta import selection_delta, selection_delta_padded
from omnikv.offload.layouts import gather_into, gather_packed, scatter_rows, to_work_layout
from omnikv.offload.reload import reload_op, reload_rows, triton_unusable_reason
from omnikv.offload.transfer import Transfer


STATIC_NEEDS_DEVICE_GATHER = (
    "static / compile decoding gathers on the device; the host_gather transfer reads the indices on "
    "the host every step (or this device cannot map host memory). Use transfer='cuda_device_gather' "
    "(or 'simulated')"
)


class Load(NamedTuple):
    h2d_bytes: int  # bytes this load moved host->device (0 without a link)
    partial: bool  # only the changed rows were moved (a partial reload)


class Gather(Protocol):
    """What `Segment.load` calls (see the module docstring)."""

    kind: str

    def load(self, bank: PackedBank, work: WorkBuffer, idx: torch.Tensor, prev: torch.Tensor | None) -> Load:
        ...


@dataclass
class GatherContext:
    """What every strategy of one segment shares."""

    transfer: Transfer
    device: torch.device  # the compute device (where `work` lives)
    stream: Any  # the segment's side stream (None without a link)
    partial_reload: bool  # OmniKVConfig.partial_reload
    # (1,) int64 device counter (`Transfer.device_counter`) the reload kernel adds its bytes to;
    # None where no partial reload crosses a link
    moved: torch.Tensor | None = None

    def reload_kernel(self, bank: PackedBank) -> bool:
        """The sync-free partial reload can run: across a link, asked for, and the Triton kernel
        runs here (a GPU, or the interpreter in tests) over a contiguous bank. Without Triton the
        kernel's torch twin would move every row anyway: the full gather is the same traffic."""
        return self.reload_kernel_unavailable(bank) is None

    def reload_kernel_unavailable(self, bank: PackedBank) -> str | None:
        """Why `reload_kernel` is False (None: the kernel runs)."""
        if self.moved is None or not self.partial_reload:
            return "no partial reload across a link"
        if not bank.data.is_contiguous():
            return "the bank is not contiguous"
        return triton_unusable_reason(self.device, bank.data.dtype)


class InlineGather:
    """Bank and working buffer on one device: gather in place."""

    kind = "inline"

    def __init__(self, ctx: GatherContext) -> None:
        self.ctx = ctx

    def load(self, bank: PackedBank, work: WorkBuffer, idx: torch.Tensor, prev: torch.Tensor | None) -> Load:
        """A partial reload moves its rows twice (gather, then scatter), so it is used only when
        at most half of the rows changed, and not on a GPU, where sizing it reads a count back to
        the host."""
        data, dst = bank.data[: bank.length], work.selection()
        if prev is not None and self.ctx.partial_reload and dst.device.type == "cpu":
            slots, tokens = selection_delta(prev, idx, bank.length)
            m = tokens.shape[-1]
            if m < idx.shape[-1] and 2 * m <= idx.shape[-1]:
                work.indices = prev.scatter(-1, slots, tokens)
                if m:
                    scatter_rows(dst, slots, to_work_layout(gather_packed(data, tokens)))
                return Load(0, True)
        work.indices = idx
        gather_into(data, idx, dst)
        return Load(0, False)


class DeviceGather:
    """Offload, device_gather: the GPU reads the selected rows straight from the mapped host bank
    with device indices, on the side stream; nothing waits on the host.

    With the reload kernel (`GatherContext.reload_kernel`) and a previous selection, only the
    rows that changed cross the link: the change is computed on the device at a fixed width
    (`selection_delta_padded`) and the kernel's masked loads read only the changed rows into the
    freed slots, adding their bytes to the device counter. Otherwise every load moves all k rows
    (each selected token one contiguous read of L * 2 * H * D elements, then a device copy lays
    them out per layer): sizing a partial copy with torch operations would read the count of
    changed rows on the host (a sync)."""

    kind = "device_gather"

    def __init__(self, ctx: GatherContext) -> None:
        self.ctx = ctx

    def load(self, bank: PackedBank, work: WorkBuffer, idx: torch.Tensor, prev: torch.Tensor | None) -> Load:
        t, device, stream = self.ctx.transfer, self.ctx.device, self.ctx.stream
        src, dst = bank.gather_source(device)[: bank.length], work.selection()
        if prev is not None and self.ctx.reload_kernel(bank) and work.data.is_contiguous():
            return self._reload(src, work, idx, prev)
        t.after_compute(stream, device)  # the indices (and bank writes) are ready

        def gather():
            dst.copy_(to_work_layout(gather_packed(src, idx)))

        t.launch(stream, gather, writes=(dst,))
        t.keep_alive(idx, stream)
        work.indices = idx
        nbytes = idx.shape[0] * idx.shape[-1] * bank.token_bytes()
        t.count(h2d=nbytes)
        work.ready = t.record(stream, device)
        return Load(nbytes, False)

    def _reload(self, src: torch.Tensor, work: WorkBuffer, idx: torch.Tensor, prev: torch.Tensor) -> Load:
        """The partial reload: slots of `prev` whose position left the selection take the new
        positions of `idx`; the bytes are counted on the device (`Load` reports 0 host-counted)."""
        t, device, stream, moved = self.ctx.transfer, self.ctx.device, self.ctx.stream, self.ctx.moved
        slots, tokens, changed = selection_delta_padded(prev, idx, src.shape[0])  # (B, G, k) each
        t.after_compute(stream, device)  # the delta (and bank writes) are ready
        data = work.data

        def reload():
            reload_rows(src, data, slots, tokens, changed, moved)

        # No poisoning of `data`: the slots that keep their rows are read as they are.
        t.launch(stream, reload)
        for x in (slots, tokens, changed):
            t.keep_alive(x, stream)
        work.indices = prev.scatter(-1, slots, tokens)  # positions in slot order, a permutation of idx
        work.ready = t.record(stream, device)
        return Load(0, True)


class HostGather:
    """Offload, host_gather: the indices come to the host (one counted sync), the host gathers the
    rows that changed into page-locked staging, one contiguous copy moves them and the side stream
    scatters them into their slots."""

    kind = "host_gather"

    def __init__(self, ctx: GatherContext) -> None:
        self.ctx = ctx
        self.host_indices: torch.Tensor | None = None  # `work.indices` on the host
        self.staging: torch.Tensor | None = None  # page-locked, sized for a full load

    def load(self, bank: PackedBank, work: WorkBuffer, idx: torch.Tensor, prev: torch.Tensor | None) -> Load:
        t, device, stream = self.ctx.transfer, self.ctx.device, self.ctx.stream
        t.host_wait(bank.written, "host gather: prompt rows still arriving in the bank")
        host_idx = t.to_host(idx, "host gather: selected indices to the host")
        host_prev = self.host_indices if prev is not None else None
        slots, tokens = None, host_idx
        if host_prev is not None and self.ctx.partial_reload:
            s, tok = selection_delta(host_prev, host_idx, bank.length)
            if tok.shape[-1] < host_idx.shape[-1]:
                slots, tokens = s, tok
        self.host_indices = host_idx if slots is None else host_prev.scatter(-1, slots, tokens)
        work.indices = self.host_indices.to(device, non_blocking=True)
        m = tokens.shape[-1]
        if m == 0:
            return Load(0, slots is not None)
        t.host_wait(work.ready, "host gather: staging still being copied")  # staging is reused
        rows = self._staging(bank, m, work.k)
        rows.copy_(gather_packed(bank.data[: bank.length], tokens))
        landed = t.device_empty(rows.shape, rows.dtype, device)
        t.after_compute(stream, device)
        t.copy(stream, landed, rows)
        dev_slots = None if slots is None else slots.to(device, non_blocking=True)
        dst = work.selection()

        def place():
            if dev_slots is None:
                dst.copy_(to_work_layout(landed))
            else:
                scatter_rows(dst, dev_slots, to_work_layout(landed))

        t.launch(stream, place, writes=(dst,) if slots is None else ())
        t.keep_alive(landed, stream)
        work.ready = t.record(stream, device)
        return Load(rows.numel() * rows.element_size(), slots is not None)

    def _staging(self, bank: PackedBank, m: int, k: int) -> torch.Tensor:
        """Page-locked (M, B, L, 2, H, D) rows, the front of one buffer sized for a full load of
        the working buffer's k rows."""
        _, b, lsz, _, h, d = bank.data.shape
        row = b * lsz * 2 * h * d
        if self.staging is None or self.staging.numel() < m * row:
            self.staging = self.ctx.transfer.host_empty((max(m, k) * row,), bank.data.dtype, torch.device("cpu"))
        return self.staging[: m * row].view(m, b, lsz, 2, h, d)


class StaticGather:
    """A static decode run: the selection's rows into `StaticWork` every step, on the compute
    stream, without a host read. The bank rows it reads are fixed when the run begins (`begin`).

    Across a link with the reload kernel (`GatherContext.reload_kernel`), a step moves only the
    changed rows: `held` (B, G, k), a buffer of the run, holds the positions in the slots; the
    step computes the delta against it on the device and calls the kernel as one custom op
    (`torch.ops.omnikv.reload_rows`, opaque to the compiler), whose bytes land in the device
    counter. Otherwise every step gathers all k rows with tensor operations."""

    kind = "static"

    def __init__(self, ctx: GatherContext) -> None:
        self.ctx = ctx
        self.source: torch.Tensor | None = None  # (prompt length, B, L, 2, H, D) the bank as read
        self.link = False
        self.step_bytes = 0  # what one step's gather reads across the link (counted outside the step)
        self.held: torch.Tensor | None = None  # (B, G, k) positions in the slots (partial reload)
        self.reload: Any = None  # torch.ops.omnikv.reload_rows, when `held` is set

    def begin(self, bank: PackedBank, work: StaticWork, link: bool, groups: int = 1) -> None:
        """Outside compiled code, before the first step of a run (the bank's rows complete on the
        compute stream): the rows it gathers from are fixed. `groups` is the selection's G (1, or
        the KV heads when each head selects its own rows)."""
        src = bank.gather_source(self.ctx.device) if link else bank.data
        self.source = src[: bank.length]
        self.link = link
        self.held = None
        if link and 0 < work.k <= bank.length and self.ctx.reload_kernel(bank):
            self.reload = reload_op()  # looked up here: dynamo must not trace the registration
            self._fill_first(bank, work, groups)
        # A full gather: k rows of every sequence of the batch cross the link at every step (a
        # partial reload's bytes are on the device counter instead)
        self.step_bytes = work.data.shape[2] * work.k * bank.token_bytes() if link and self.held is None else 0
        mark_static(self.ctx.device, self.source, *(() if self.held is None else (self.held, self.ctx.moved)))

    def _fill_first(self, bank: PackedBank, work: StaticWork, groups: int) -> None:
        """Outside compiled code: the slots hold positions 0..k-1 (every group), gathered once and
        counted, so that every step's delta starts from a true state."""
        b, k = work.data.shape[2], work.k
        self.held = torch.arange(k, device=self.ctx.device).expand(b, groups, k).contiguous()
        work.write_selection(to_work_layout(gather_packed(self.source, self.held)))
        self.ctx.transfer.count(h2d=b * k * bank.token_bytes())

    def load(self, bank: PackedBank, work: StaticWork, idx: torch.Tensor, prev: torch.Tensor | None) -> Load:
        if self.held is not None:
            slots, tokens, changed = selection_delta_padded(self.held, idx, self.source.shape[0])
            self.reload(self.source, work.data, slots, tokens, changed, self.ctx.moved)
            # into `held` itself, not a new tensor: a captured graph keeps reading the same buffer
            self.held.copy_(self.held.scatter(-1, slots, tokens))
            work.indices = self.held
            return Load(0, True)
        b, g, _ = idx.shape
        if self.link or b > 1 or g > 1:  # whole-token reads (across the link), then per layer
            rows = to_work_layout(gather_packed(self.source, idx))
        else:  # `gather_into`'s one pass, without `out=` (dynamo cannot trace a strided out=)
            rows = self.source.permute(2, 3, 1, 4, 0, 5).index_select(4, idx[0, 0])
        work.write_selection(rows)
        work.indices = idx
        return Load(0, False)  # counted outside the compiled step: `step_bytes`


GATHERS: dict[str, type[Gather]] = {g.kind: g for g in (InlineGather, DeviceGather, HostGather, StaticGather)}


def choose_gather(transfer: Transfer, bank: PackedBank, device: torch.device, *, link: bool, static: bool) -> str:
    """The one place a gather strategy is chosen: the kind (a key of `GATHERS`) for a segment
    whose bank is `bank`. With a link, asking the bank for its gather source settles the transfer's
    strategy first (a CUDA driver that cannot map host memory switches it to the host gather)."""
    if not link:
        return StaticGather.kind if static else InlineGather.kind
    if static and transfer.gather == HostGather.kind:
        raise ConfigError(STATIC_NEEDS_DEVICE_GATHER)
    bank.gather_source(device)
    if transfer.gather == HostGather.kind:
        if static:  # the mapping failed just now
            raise ConfigError(STATIC_NEEDS_DEVICE_GATHER)
        return HostGather.kind
    return StaticGather.kind if static else DeviceGather.kind
