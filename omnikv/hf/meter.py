"""The device meter: what a cache holds on the compute device, live and at its peak.

`cache.stats()["device_kv_bytes"]` is a snapshot of the rows in use; what decides whether a long
prompt fits an accelerator is the *highest* device footprint on the way there (the prefill keeps
working buffers a decode step does not). Every device buffer a managed cache allocates for KV (the
dense layers' buffers, the offload path's working buffer, streamed prefixes, pack and staging
buffers) is made by, or handed to, its `DeviceMeter`, which adds its bytes while the tensor lives and
keeps the maximum. It works the same on a CPU run: the figure is what a GPU would hold, counted
through the same code, so a test can check the memory plan against it without a GPU.

A tensor is counted until its Python object is collected: views keep their base alive (`_base`),
and work queued on a side stream keeps its tensors alive (omnikv/offload/transfer.py), so the count
drops when the memory can really be reused.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch


class DeviceMeter:
    """Live and peak bytes of the device tensors made by `empty` / `zeros` or passed to `track`."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()  # finalizers may run on another thread (the collector's)

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count `tensor` (a freshly allocated base tensor) until it is collected; returns it."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return tensor
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, nbytes)
        return tensor

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        return self.track(torch.empty(tuple(shape), dtype=dtype, device=device))

    def zeros(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        return self.track(torch.zeros(tuple(shape), dtype=dtype, device=device))

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (a benchmark measuring one phase)."""
        with self._lock:
            self.peak = self.live

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes
