"""Every copy, stream and event of the Context Bank goes through one `Transfer` object.

Three implementations share the interface, so the ordering logic of a segment (the prompt writer,
omnikv/offload/prompt.py, and the gather strategies, omnikv/offload/gathers.py) is the same code on
every machine:

* `InlineTransfer` - bank and working buffer on one device (a CPU run, or offload switched off):
  no streams, copies run at once, nothing to wait for.
* `CudaTransfer` - the bank in page-locked host memory, loads on a side stream per device, CUDA
  events between the streams. The selected rows are gathered on the GPU straight from mapped host
  memory with device indices (`device_gather`), so the indices never leave the device; where the
  driver cannot map host memory the gather runs on the host into pinned staging (`host_gather`),
  which needs the indices on the host (one counted sync per load).
* `SimulatedTransfer` - the CUDA ordering rules on a CPU (`OmniKVCache(model, cfg,
  transfer="simulated")`): work sent to the side stream does not run until an event recorded after
  it is waited on, and every tensor it will write is filled with NaN the moment it is issued. A
  layer that reads a buffer before waiting on the copy into it reads NaN, so a missing wait fails a
  test instead of passing by luck.

All three count what the issue of a GPU run is about: host syncs, host->device and device->host
bytes, and they refuse a host<->device copy that is not contiguous on both sides (PyTorch would
silently route such a copy through a pageable temporary and block).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv.errors import ConfigError

TRANSFER_KINDS = ("auto", "inline", "cuda", "cuda_device_gather", "cuda_host_gather", "simulated",
                  "simulated_host_gather")


@dataclass
class TransferCounters:
    """Running totals; `mark()` / `since()` give the figures of one step or one prefill."""

    host_syncs: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    pinned_bytes: int = 0  # page-locked host memory held right now (exact allocation)
    sync_sites: list[str] = field(default_factory=list)  # why each sync happened (last 64)

    def snapshot(self) -> tuple[int, int, int]:
        return self.host_syncs, self.h2d_bytes, self.d2h_bytes

    def since(self, mark: tuple[int, int, int]) -> dict[str, int]:
        s, h, d = mark
        return {"host_syncs": self.host_syncs - s, "h2d_bytes": self.h2d_bytes - h, "d2h_bytes": self.d2h_bytes - d}


class Transfer:
    """The interface (and the inline implementation's behaviour where it is the same).

    Streams and events are opaque handles; `None` is the compute stream. A `Transfer` serves one
    cache and every device that cache's segments live on.
    """

    kind = "inline"
    offloads = False  # bank in host memory, working buffers on an accelerator
    gather = "inline"  # how the selected rows reach the working buffer

    def __init__(self) -> None:
        self.counters = TransferCounters()

    # -- memory ---------------------------------------------------------------------------------
    def host_empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Storage for the bank: on `device` here; page-locked host memory when offloading."""
        return torch.empty(tuple(shape), dtype=dtype, device=device)

    def gather_source(self, bank: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A tensor the gather kernel can read the bank through (the bank itself when inline)."""
        return bank

    # -- streams and events ---------------------------------------------------------------------
    def side_stream(self, device: torch.device) -> Any:
        return None

    def after_compute(self, stream: Any, device: torch.device) -> None:
        """Make `stream` wait for everything issued so far on the compute stream (device-side)."""

    def launch(self, stream: Any, fn: Callable[[], None], writes: Sequence[torch.Tensor] = ()) -> None:
        """Run `fn` (kernels) on `stream`; `writes` are the tensors it fills."""
        fn()

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src on `stream`, asynchronous where the hardware allows; counted."""
        self._count_copy(dst, src)
        dst.copy_(src)

    def record(self, stream: Any, device: torch.device) -> Any:
        """An event marking the work issued so far on `stream`."""
        return None

    def wait(self, event: Any, device: torch.device) -> None:
        """Make the compute stream wait for `event` (device-side, the host does not block)."""

    def host_wait(self, event: Any, why: str) -> None:
        """Block the host until `event` has happened (a counted sync)."""
        if event is not None:
            self._count_sync(why)

    def to_host(self, tensor: torch.Tensor, why: str) -> torch.Tensor:
        """A host copy of a device tensor, blocking when it lives on an accelerator (counted)."""
        if tensor.device.type != "cpu":
            self._count_sync(why)
        return tensor.cpu()

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        """`tensor` was used on `stream`: do not hand its memory out before that work is done."""

    # -- accounting -----------------------------------------------------------------------------
    def count(self, *, h2d: int = 0, d2h: int = 0) -> None:
        """Bytes a kernel moves across the link by itself (a gather from mapped host memory)."""
        self.counters.h2d_bytes += h2d
        self.counters.d2h_bytes += d2h

    def _count_sync(self, why: str) -> None:
        c = self.counters
        c.host_syncs += 1
        c.sync_sites.append(why)
        del c.sync_sites[:-64]

    def _count_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.device.type == src.device.type and not self._is_link(dst, src):
            return
        if not (dst.is_contiguous() and src.is_contiguous()):
            raise RuntimeError(
                f"omnikv: a host<->device copy between non-contiguous tensors ({tuple(src.shape)} "
                f"strides {src.stride()} -> strides {dst.stride()}) would go through a pageable "
                f"temporary and block; this is a bug in omnikv, please report it"
            )
        nbytes = src.numel() * src.element_size()
        if self._is_host(src) and not self._is_host(dst):
            self.counters.h2d_bytes += nbytes
        elif self._is_host(dst) and not self._is_host(src):
            self.counters.d2h_bytes += nbytes

    def _is_link(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        return self._is_host(dst) != self._is_host(src)

    def _is_host(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"


class InlineTransfer(Transfer):
    """Bank and working buffer on the same device: every operation runs at once."""


class CudaTransfer(Transfer):
    """Page-locked host bank, side stream per device, events; see the module docstring."""

    kind = "cuda"
    offloads = True

    def __init__(self, gather: str = "auto") -> None:
        super().__init__()
        if gather not in ("auto", "device_gather", "host_gather"):
            raise ConfigError(f"gather {gather!r} is unknown; choose auto, device_gather or host_gather")
        self.gather = gather
        self._streams: dict[int, torch.cuda.Stream] = {}

    def host_empty(self, shape, dtype, device):
        t = torch.empty(tuple(shape), dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return t
        # Register exactly these bytes: the caching pinned allocator (pin_memory=True) rounds every
        # block up to a power of two and keeps freed blocks, which costs up to 2x at 128K.
        # Flags: portable (1) | mapped (2), so that kernels can read it through UVA.
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 3)
        if int(err) != 0:
            t = torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
            self.counters.pinned_bytes += 1 << math.ceil(math.log2(max(nbytes, 1)))
            self.gather = "host_gather" if self.gather == "auto" else self.gather
            return t
        self.counters.pinned_bytes += nbytes
        ptr, counters = t.data_ptr(), self.counters
        weakref.finalize(t, _unregister, ptr, nbytes, counters)
        return t

    def gather_source(self, bank, device):
        if self.gather == "host_gather":
            return bank
        view = _mapped_view(bank, device)
        if view is None:
            self.gather = "host_gather"
            return bank
        self.gather = "device_gather"
        return view

    def side_stream(self, device):
        idx = torch.device(device).index or 0
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=device)
        return self._streams[idx]

    def after_compute(self, stream, device):
        stream.wait_stream(torch.cuda.current_stream(device))

    def launch(self, stream, fn, writes=()):
        with torch.cuda.stream(stream):
            fn()

    def copy(self, stream, dst, src):
        self._count_copy(dst, src)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream, device):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event, device):
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)

    def host_wait(self, event, why):
        if event is not None and not event.query():
            self._count_sync(why)
            event.synchronize()

    def keep_alive(self, tensor, stream):
        if tensor.is_cuda:  # host memory is not handed out by the CUDA caching allocator
            tensor.record_stream(stream)

    def _is_host(self, t):
        return t.device.type == "cpu"


def _unregister(ptr: int, nbytes: int, counters: TransferCounters) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    finally:
        counters.pinned_bytes -= nbytes


def _mapped_view(bank: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the page-locked, mapped host `bank` (UVA: the device address of
    registered host memory is its host address), or None when this driver/PyTorch refuses it.
    Checked by reading a few rows back through it."""

    class _Interface:
        __cuda_array_interface__ = {
            "shape": (bank.numel() * bank.element_size(),),
            "typestr": "|u1",
            "data": (bank.data_ptr(), False),
            "version": 3,
        }

    try:
        raw = torch.as_tensor(_Interface(), device=device)
        view = raw.view(bank.dtype).view(bank.shape)
        probe = torch.arange(min(bank.shape[0], 4), device=device)
        if not torch.equal(view.index_select(0, probe).cpu(), bank.index_select(0, probe.cpu())):
            return None
        return view
    except Exception:  # noqa: BLE001 - any refusal means: gather on the host instead
        return None


class SimulatedTransfer(Transfer):
    """CUDA's ordering rules on a CPU, strict enough that a missing wait fails a test.

    "Host" is the bank's memory and "device" the working buffers (both CPU memory here). Work on
    the side stream is queued, its targets poisoned with NaN at once; it runs, in order, when an
    event recorded after it is waited on (`wait` or `host_wait`). The compute stream runs eagerly.
    `gather` picks which CUDA strategy is simulated: `device_gather` (indices stay on the device,
    no sync) or `host_gather` (the indices are read back to the host: a counted sync per load).
    """

    kind = "simulated"
    offloads = True

    def __init__(self, gather: str = "device_gather") -> None:
        super().__init__()
        if gather not in ("device_gather", "host_gather"):
            raise ConfigError(f"gather {gather!r} is unknown; choose device_gather or host_gather")
        self.gather = gather
        self._queue: list[tuple[int, Callable[[], None]]] = []
        self._issued = 0  # ops issued on the side stream so far
        self._done = 0  # ops run so far
        self._hosts: weakref.WeakSet = weakref.WeakSet()

    def host_empty(self, shape, dtype, device):
        t = torch.empty(tuple(shape), dtype=dtype)
        self._hosts.add(t)
        nbytes = t.numel() * t.element_size()
        self.counters.pinned_bytes += nbytes
        weakref.finalize(t, _release, nbytes, self.counters)
        return t

    def side_stream(self, device):
        return "side"

    def launch(self, stream, fn, writes=()):
        if stream is None:
            fn()
            return
        for t in writes:
            if t.is_floating_point():
                t.fill_(float("nan"))
        self._issued += 1
        self._queue.append((self._issued, fn))

    def copy(self, stream, dst, src):
        self._count_copy(dst, src)
        self.launch(stream, lambda: dst.copy_(src), writes=(dst,))

    def record(self, stream, device):
        return self._issued if stream is not None else None

    def wait(self, event, device):
        self._run_until(event)

    def host_wait(self, event, why):
        if event is not None and event > self._done:
            self._count_sync(why)
        self._run_until(event)

    def to_host(self, tensor, why):
        self._count_sync(why)
        return tensor.clone()

    def _run_until(self, event: int | None) -> None:
        if event is None:
            return
        while self._queue and self._queue[0][0] <= event:
            n, fn = self._queue.pop(0)
            fn()
            self._done = n

    def _is_host(self, t):
        # The bank and its staging are what host_empty made; every other tensor is "device".
        return any(t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for h in self._hosts)

    def _is_link(self, dst, src):
        return self._is_host(dst) != self._is_host(src)


def _release(nbytes: int, counters: TransferCounters) -> None:
    counters.pinned_bytes -= nbytes


def make_transfer(kind: str | Transfer | None, offload: bool, device: torch.device) -> Transfer:
    """The transfer for a cache: `kind` from `OmniKVCache(..., transfer=...)`."""
    if isinstance(kind, Transfer):
        return kind
    kind = kind or "auto"
    if kind not in TRANSFER_KINDS:
        raise ConfigError(f"transfer {kind!r} is unknown; choose one of {TRANSFER_KINDS}")
    if kind.startswith("simulated"):
        return SimulatedTransfer("host_gather" if kind.endswith("host_gather") else "device_gather")
    if kind.startswith("cuda") or (kind == "auto" and offload and torch.device(device).type == "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"transfer={kind!r} needs a CUDA device; use transfer='simulated' to run the offload path on CPU")
        gather = kind[len("cuda_"):] if kind.startswith("cuda_") else "auto"
        return CudaTransfer(gather)
    return InlineTransfer()
