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
import mmap
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omnikv.errors import ConfigError
from omnikv.hf.meter import DeviceMeter
from omnikv.offload.mapped import mapped_memory, start_probe

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
    # (1,) int64 running totals on a device, one per `Transfer.device_counter`: bytes a kernel
    # counted where it ran (the partial reload's changed rows). Read only by `settle`, outside a
    # step: reading one is a host sync.
    device_h2d: list[torch.Tensor] = field(default_factory=list)

    def snapshot(self) -> tuple[int, int, int, tuple[torch.Tensor, ...]]:
        """The totals now; the device totals as device copies (no host read)."""
        return self.host_syncs, self.h2d_bytes, self.d2h_bytes, tuple(c.clone() for c in self.device_h2d)

    def since(self, mark: tuple[int, int, int, tuple[torch.Tensor, ...]]) -> dict[str, Any]:
        """What was counted after `mark`. The device-counted bytes stay device tensors under
        "h2d_device" (no host read in a step); `settle` adds them to "h2d_bytes"."""
        s, h, d, dev = mark
        on_device = [c - dev[i] if i < len(dev) else c.clone() for i, c in enumerate(self.device_h2d)]
        return {"host_syncs": self.host_syncs - s, "h2d_bytes": self.h2d_bytes - h, "d2h_bytes": self.d2h_bytes - d,
                "h2d_device": on_device}


def settle(figures: dict[str, Any]) -> dict[str, int]:
    """`since`'s figures with the device-counted bytes read into "h2d_bytes" (a host read of each
    device counter: call it outside a decode step, e.g. from `stats()`)."""
    out = {k: v for k, v in figures.items() if k != "h2d_device"}
    out["h2d_bytes"] = out.get("h2d_bytes", 0) + sum(int(c.sum()) for c in figures.get("h2d_device", ()))
    return out


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
        self.meter = DeviceMeter()  # the cache's device meter: every device buffer below is counted

    def device_empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A device buffer of the offload path (working buffer, streamed prefix, pack, staging),
        counted by the meter while it lives."""
        return self.meter.empty(shape, dtype, device)

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
    def device_counter(self, device: torch.device) -> torch.Tensor:
        """A (1,) int64 zero on `device` to which kernels add the bytes they move across the link
        (omnikv/offload/reload.py); counted into the step's h2d figure, read outside the step."""
        counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.counters.device_h2d.append(counter)
        return counter

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
    """Page-locked host bank, side stream per device, events; see the module docstring.

    `host_memory` says what the bank got: "registered" (exactly sized, mapped: the device gather
    can read it), "pinned" (PyTorch's pinned allocator: this process could not register host
    memory; host gather) or "pageable" (no page-locked memory at all; host gather, and each copy
    blocks). `gather_reason` says why the gather strategy is what it is.
    """

    kind = "cuda"
    offloads = True

    def __init__(self, gather: str = "auto") -> None:
        super().__init__()
        if gather not in ("auto", "device_gather", "host_gather"):
            raise ConfigError(f"gather {gather!r} is unknown; choose auto, device_gather or host_gather")
        self.gather = gather
        self.gather_reason = "asked for" if gather != "auto" else "not decided yet (first decode step)"
        self.host_memory = "registered"
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._devices: set[int] = set()  # devices whose work may touch the bank (synced before unregistering)

    def host_empty(self, shape, dtype, device):
        shape = tuple(shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        t = _register_host(nbytes, self.counters, self._devices)
        if t is not None:
            return t.view(dtype).view(shape)
        self._no_mapping("this process could not register (page-lock and map) host memory")
        try:  # PyTorch's pinned allocator: page-locked, not mapped for our kernels
            t = torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:
            _clear_stale_cuda_error()
            self.host_memory = "pageable"
            _warn_once(f"omnikv: no page-locked host memory ({str(exc).splitlines()[0][:160]}); the Context "
                       "Bank uses pageable memory, so every host<->device copy of it blocks")
            return torch.empty(shape, dtype=dtype)
        if self.host_memory == "registered":
            self.host_memory = "pinned"
        self.counters.pinned_bytes += 1 << math.ceil(math.log2(max(nbytes, 1)))  # the allocator's block
        return t

    def _no_mapping(self, why: str) -> None:
        if self.gather == "auto":
            self.gather, self.gather_reason = "host_gather", why
        elif self.gather == "device_gather":
            raise ConfigError(f"transfer='cuda_device_gather' cannot run here: {why}; use 'cuda' or 'cuda_host_gather'")

    def gather_source(self, bank, device):
        if self.gather == "host_gather":
            return bank
        if self.host_memory != "registered":
            self._no_mapping(f"the bank is {self.host_memory} host memory, not mapped")
            return bank
        answer = mapped_memory(torch.device(device))
        view = _mapped_view(bank, device) if answer.usable else None
        if view is None:
            self._no_mapping(answer.reason if not answer.usable else "PyTorch refused a tensor over mapped host memory")
            return bank
        self.gather, self.gather_reason = "device_gather", answer.reason
        return view

    def side_stream(self, device):
        idx = torch.device(device).index or 0
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=device)
            self._devices.add(idx)
            if self.gather in ("auto", "device_gather") and self.host_memory == "registered":
                start_probe(torch.device(device))  # answered by the first decode step's load
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


# -- page-locked host memory of exactly the size asked for ---------------------------------------------
_PAGE = mmap.PAGESIZE
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2  # kernels of every device can read it through UVA
_deferred_unregister: list[tuple] = []  # finalizers that ran while a CUDA graph was being captured


def _register_host(nbytes: int, counters: TransferCounters, devices: set[int]) -> torch.Tensor | None:
    """`nbytes` of page-aligned host memory registered with CUDA (page-locked, mapped), as a uint8
    tensor; None when the driver refuses (the stale error it leaves is cleared).

    Exactly `nbytes` (PyTorch's pinned allocator rounds every block up to a power of two and keeps
    freed blocks: up to 2x at 128K). The memory is a numpy buffer so that it is unregistered when
    the *last* tensor over it dies, not the first (the bank's views, the mapped view and copies
    still in flight on a side stream all share it): the finalizer watches the array the tensors
    hold, and first waits for the devices that may still read or write it."""
    _run_deferred_unregisters()
    raw = np.empty(nbytes + 2 * _PAGE, dtype=np.uint8)  # slack: page-align the start, own the last page
    start = (-raw.ctypes.data) % _PAGE
    arr = raw[start : start + nbytes]
    ptr = arr.ctypes.data
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED))
    if err != 0:
        # PyTorch's binding hands the error code back but leaves it as the runtime's "last
        # error", which the next unrelated kernel launch would raise: consume it here.
        _clear_stale_cuda_error()
        return None
    counters.pinned_bytes += nbytes
    weakref.finalize(arr, _unregister, raw, ptr, nbytes, counters, devices)
    return torch.from_numpy(arr)


def _unregister(raw, ptr: int, nbytes: int, counters: TransferCounters, devices: set[int]) -> None:
    """Finalizer of a registered buffer (`raw` keeps its memory alive until this returns). Never
    raises: it runs from the garbage collector, possibly at interpreter exit."""
    try:
        if torch.cuda.is_current_stream_capturing():  # a sync now would break the capture
            _deferred_unregister.append((raw, ptr, nbytes, counters, devices))
            return
        for idx in sorted(devices):  # copies into it / gathers from it may still be running
            torch.cuda.synchronize(idx)
        if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
            _clear_stale_cuda_error()
    except Exception:  # noqa: BLE001 - CUDA may be shut down already; the memory is freed either way
        pass
    counters.pinned_bytes -= nbytes


def _run_deferred_unregisters() -> None:
    while _deferred_unregister:
        _unregister(*_deferred_unregister.pop())


def _clear_stale_cuda_error() -> None:
    """Consume the CUDA runtime's "last error" that a failed runtime call left behind.

    PyTorch checks every kernel launch with cudaGetLastError, which returns and clears it: one
    throwaway launch raises the stale error here, where it is expected, instead of in the next
    unrelated kernel. A second failure means the context itself is broken: that is raised."""
    for attempt in range(2):
        try:
            sleep = getattr(torch.cuda, "_sleep", None)
            if sleep is not None:
                sleep(0)  # one tiny kernel, launch-checked
            else:
                torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
            return
        except RuntimeError:
            if attempt:
                raise


def _mapped_view(bank: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the registered, mapped host `bank` (UVA: the device address of
    registered host memory is its host address), or None when PyTorch refuses to build one.

    Nothing is read through it here: whether kernels may read mapped memory at all was asked of a
    child process (`omnikv.offload.mapped`), and reading the bank now would race with copies into
    it still running on the side stream. The view keeps the bank alive: kernels read its memory."""

    class _Interface:
        __cuda_array_interface__ = {
            "shape": (bank.numel() * bank.element_size(),),
            "typestr": "|u1",
            "data": (bank.data_ptr(), False),
            "version": 3,
        }
        owner = bank  # as_tensor keeps this object alive as long as the view

    try:
        raw = torch.as_tensor(_Interface(), device=device)
    except (RuntimeError, TypeError, ValueError):  # nothing ran on the device: a clean refusal
        return None
    return raw.view(bank.dtype).view(bank.shape)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
