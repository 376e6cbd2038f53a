"""A segment: the sparse layers that follow one filter layer (on one device), and everything their
rows go through. Each part is the one owner of its concept:

* `PackedBank` (bank.py) - every prompt row, token-major, in host memory when offloading;
* `WorkBuffer` / `StaticWork` (bank.py) - the rows the sparse layers attend when decoding, on the
  compute device: the k selected prompt rows, then the generated tokens;
* `PromptWriter` (prompt.py) - prompt forwards: rows into the bank (offload: through a
  `PrefixStream`, stream.py: each layer's prefix read back one layer ahead, each chunk sent to the
  bank), generated rows into the bank when a new prompt forward comes;
* a gather strategy (gathers.py, chosen by `choose_gather`) - the selected rows into the working
  buffer.

The filter layer calls `prefetch_prompt` (prompt forwards) and `load`; the sparse layers call `write_prompt` (prompt forwards),
`append_generated` (eager decode) or `append_static` (static decode).
"""

from __future__ import annotations

import torch

from omnikv.offload.bank import PackedBank, StaticWork, WorkBuffer
from omnikv.offload.gathers import GATHERS, Gather, GatherContext, StaticGather, choose_gather
from omnikv.offload.prompt import PromptWriter
from omnikv.offload.transfer import Transfer


class Segment:
    """The sparse layers that follow one filter layer (on one device), with their packed bank."""

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
        self.device: torch.device | None = None
        self.bank: PackedBank | None = None
        self.writer: PromptWriter | None = None
        self.work = WorkBuffer(self.transfer, None)
        self.static_gather: StaticGather | None = None  # set while a static decode run is prepared
        self._gathers: dict[str, Gather] = {}  # kind -> strategy instance (strategies keep state)
        self._context: GatherContext | None = None
        self.loaded_step: int | None = None
        self.h2d_bytes = 0  # of the last load
        self.partial_loads = 0  # loads that moved only the changed rows (telemetry / tests)
        self.reserved_rows = 0  # prompt rows the bank is sized for (from `reserve`)
        self.decode_reserve = 0  # generated rows the working buffer is sized for (from `reserve`)

    # -- set-up -------------------------------------------------------------------------------------
    def attach(self, like: torch.Tensor) -> None:
        """Called by each sparse layer's first update (B, H, n, D): allocate, check devices."""
        if self.device is not None:
            return
        self.device = like.device
        bank_device = torch.device("cpu") if self.offload else like.device
        self.bank = PackedBank(len(self.layers), self.transfer, bank_device)
        self.bank.reserved = self.reserved_rows
        self.bank.on_device = not self.offload
        stream = self.transfer.side_stream(like.device) if self.link else None
        self.writer = PromptWriter(self.bank, self.transfer, like.device, stream, self.link)
        self.work = WorkBuffer(self.transfer, like.device)
        # Bytes the partial-reload kernel moves are counted on the device, read outside the step.
        moved = self.transfer.device_counter(like.device) if self.link and self.partial_reload else None
        self._context = GatherContext(self.transfer, like.device, stream, self.partial_reload, moved)

    def reserve(self, total_rows: int, decode_rows: int) -> None:
        """Size the bank for `total_rows` prompt rows and `work` for `decode_rows` generated ones."""
        self.decode_reserve = max(self.decode_reserve, decode_rows)
        self.reserved_rows = max(self.reserved_rows, total_rows)
        if self.bank is not None:
            self.bank.reserved = max(self.bank.reserved, total_rows)

    # -- prompt forwards ----------------------------------------------------------------------------
    def begin_prompt(self) -> None:
        """A multi-token forward starts: generated rows join the prompt (moved to the bank; when
        offloading, the prompt's full attention streams them back with the rest of the prefix)."""
        if self.bank is not None and self.bank.data is not None and self.work.generated:
            self.writer.flush_generated(self.work)
        self.work = WorkBuffer(self.transfer, self.device)
        self.static_gather = None
        self.loaded_step = None

    def prefetch_prompt(self, start: int, n: int) -> None:
        """The filter layer saw a prompt chunk of n rows at `start`: when offloading, start reading
        the first sparse layer's prefix back from the bank (omnikv/offload/stream.py)."""
        if self.link and self.writer is not None and self.layers:
            self.writer.stream.prefetch(0, start, n)

    def write_prompt(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..start+n of layer `slot` from a prompt forward (B, H, n, D); returns what that
        layer attends to: every row so far, (B, H, start + n, D)."""
        return self.writer.write(slot, key, value, start)

    # -- decode -------------------------------------------------------------------------------------
    @property
    def indices(self) -> torch.Tensor | None:
        """(B, G, k) positions of the selected rows, in slot order (None before the first load)."""
        return self.work.indices

    @property
    def k(self) -> int:
        return self.work.k

    @property
    def generated(self) -> int:
        return self.work.generated

    def load(self, idx: torch.Tensor, step: int) -> None:
        """Make the working buffer hold rows `idx` (B, G, k) of every sparse layer of the segment,
        in one packed operation by the segment's gather strategy (omnikv/offload/gathers.py). In
        a static run (traced): tensor operations only."""
        if self.static_gather is not None:
            self.static_gather.load(self.bank, self.work, idx, None)
            return
        idx = idx.to(self.device, non_blocking=True)
        work, k = self.work, idx.shape[-1]
        prev = work.indices if work.indices is not None and work.indices.shape == idx.shape else None
        work.ensure(k, work.generated, self.bank, self.decode_reserve)
        work.k, self.loaded_step = k, step
        kind = choose_gather(self.transfer, self.bank, self.device, link=self.link, static=False)
        done = self._gather(kind).load(self.bank, work, idx, prev)
        self.h2d_bytes = done.h2d_bytes
        self.partial_loads += done.partial

    def _gather(self, kind: str) -> Gather:
        if kind not in self._gathers:
            self._gathers[kind] = GATHERS[kind](self._context)
        return self._gathers[kind]

    def wait_ready(self) -> None:
        """Make the compute stream wait until the last load has landed in the working buffer."""
        self.transfer.wait(self.work.ready, self.device)

    def append_generated(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode token's (B, H, 1, D) K/V of layer `slot`; returns the rows it attends to,
        (B, H, k + generated, D): the selection, then every generated token."""
        work = self.work
        if slot == 0:
            work.ensure(work.k, work.generated + 1, self.bank, self.decode_reserve)
            work.generated += 1
        work.append(slot, key, value)
        self.wait_ready()
        return work.attended(slot)

    # -- static decode (omnikv/hf/static.py) ------------------------------------------------------------
    def begin_static(self, k: int, decode_rows: int, groups: int = 1) -> None:
        """Outside compiled code, before the first static step after a prompt: a working buffer
        sized exactly k + `decode_rows` and zeroed, the bank complete on the compute stream, the
        gather source fixed (`groups`: the selection's G). Every later step has the same shapes."""
        self.transfer.wait(self.bank.written, self.device)  # prompt rows still arriving in the bank
        choose_gather(self.transfer, self.bank, self.device, link=self.link, static=True)
        self.work = StaticWork(self.transfer, self.device, self.bank, k, decode_rows)
        self.static_gather = StaticGather(self._context)
        self.static_gather.begin(self.bank, self.work, self.link, groups)

    def advance_static(self, step: int) -> None:
        """Outside compiled code, before a static step: count the generated row it writes and the
        bytes its gather moves (what the eager `load` counts as it runs)."""
        self.work.generated += 1
        self.loaded_step = step
        if self.link:
            self.h2d_bytes = self.static_gather.step_bytes
            self.transfer.count(h2d=self.h2d_bytes)

    def append_static(self, slot: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A static step's (B, H, 1, D) K/V of layer `slot` at the position in `pos` (0-d device
        tensor); returns all k + decode-capacity rows (B, H, n, D) of that layer."""
        return self.work.append_at(slot, key, value, pos)

    def static_positions(self) -> torch.Tensor:
        """(B, G, k + decode capacity) logical positions of the rows `append_static` returns."""
        return self.work.positions()

    # -- every row (telemetry, tests) ---------------------------------------------------------------
    def rows(self, slot: int, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row layer `slot` holds, (B, H, seq_length, D), on the compute device (drop-free
        view for telemetry and tests; waits for pending copies)."""
        self.transfer.host_wait(self.bank.written, "full rows: bank writes still arriving")
        n = min(self.bank.length, seq_length)
        k_p, v_p = (x.to(self.device) for x in self.bank.layer_view(slot, n))
        g = seq_length - k_p.shape[-2]
        if g <= 0 or self.work.data is None:
            return k_p[:, :, :seq_length], v_p[:, :, :seq_length]
        self.wait_ready()
        k_g, v_g = self.work.generated_rows(slot, g)
        return torch.cat([k_p, k_g], dim=-2), torch.cat([v_p, v_g], dim=-2)

    # -- accounting ---------------------------------------------------------------------------------
    def reload_path(self) -> str:
        """How a decode step refreshes the selected rows when the selection changes: "off"
        (partial_reload=False: every row), "inline" (no link: bank and buffer share a memory),
        "host gather" (the changed rows, gathered on the host), "triton kernel" (the changed rows,
        read by the reload kernel), or "full gather (why)" where the kernel cannot run."""
        if not self.partial_reload:
            return "off"
        if not self.link:
            return "inline"
        if self.transfer.gather == "host_gather":
            return "host gather"
        if self._context is None or self.bank is None or self.bank.data is None:
            return "not started"
        reason = self._context.reload_kernel_unavailable(self.bank)
        return "triton kernel" if reason is None else f"full gather ({reason})"

    def host_bytes(self) -> int:
        if self.bank is None or not self.offload:
            return 0
        return self.bank.used_bytes()

    def device_bytes(self) -> int:
        """Device bytes of the rows in use: the working buffer's, what a prompt forward holds
        between layers (prefixes read ahead, the pack buffer), and the bank's when it is on the
        device."""
        used = self.work.used_bytes() + (self.writer.device_bytes() if self.writer else 0)
        if self.bank is not None and not self.offload:
            used += self.bank.used_bytes()
        return used

    def allocated_device_bytes(self) -> int:
        """Device bytes allocated (capacity, not rows in use), by the same parts."""
        total = self.work.allocated_bytes() + (self.writer.device_bytes() if self.writer else 0)
        if self.bank is not None and not self.offload:
            total += self.bank.allocated_bytes()
        return total
