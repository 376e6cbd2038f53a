"""Can this machine's GPU read page-locked host memory through a device pointer? Asked of a child.

The device gather (`CudaTransfer`, gather "device_gather") reads the selected bank rows with a
kernel, straight from mapped host memory. Where the driver or a sandbox (gVisor) cannot map host
memory, that kernel faults, and an illegal-address fault is sticky: the CUDA context of the
process that ran it is dead, and no `except` brings it back. So the question is asked once per
process and device by a child process (`python -c`, torch only): it registers a small host
buffer as mapped, reads it back through a device pointer and exits 0 when the bytes match. The
parent only reads the exit status and picks the gather strategy from it; a dead context dies with
the child.

The child starts when a `CudaTransfer` that may map host memory first opens a side stream (the
first prompt forward; its start-up, a few seconds of importing torch and initialising CUDA,
overlaps the prefill) and is waited for when the first decode step asks for the gather source.

`OMNIKV_MAPPED_MEMORY`: "probe" (default), "off" (never map: gather on the host), "on" (map
without asking a child: for machines that cannot start one; a fault then ends the process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch

from omnikv.errors import ConfigError

EXIT_OK, EXIT_REFUSED, EXIT_MISMATCH, EXIT_ERROR = 0, 10, 11, 12
PROBE_TIMEOUT_S = 180.0  # CUDA start-up under a sandbox can take a minute

# The child: torch only (no omnikv import: it must start fast and must not depend on sys.path).
# argv[1] is the device the parent computes on ("cuda:0").
_CHILD = r"""
import sys
import torch

def main(device):
    torch.cuda.synchronize(device)  # CUDA is up before anything is registered
    buf = torch.arange((1 << 16) + 2048, dtype=torch.int32)  # 256 KiB of known values, page-aligned below
    start = (-buf.data_ptr() % 4096) // 4
    host = buf[start : start + (1 << 16)]
    ptr, nbytes = host.data_ptr(), host.numel() * host.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 3))  # portable | mapped
    if err != 0:
        print(f"cudaHostRegister refused host memory (error {err})", file=sys.stderr)
        return 10

    class Interface:  # the device address of registered, mapped host memory is its host address (UVA)
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}

    try:
        view = torch.as_tensor(Interface(), device=device).view(torch.int32)
        picks = torch.arange(0, host.numel(), 61, device=device)
        got = view.index_select(0, picks).cpu()  # a kernel reads host memory through the device pointer
        torch.cuda.synchronize(device)  # a fault surfaces here at the latest
        same = torch.equal(got, host[::61])
    finally:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    if not same:
        print("a kernel read different bytes through the mapped view than the host holds", file=sys.stderr)
        return 11
    return 0

try:
    sys.exit(main(torch.device(sys.argv[1])))
except SystemExit:
    raise
except BaseException as exc:
    print(f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300], file=sys.stderr)
    sys.exit(12)
"""


@dataclass(frozen=True)
class MappedMemory:
    """The answer: `usable` True when the device gather may read mapped host memory; `reason`
    says why not (or how it was decided)."""

    usable: bool
    reason: str


class _Probe:
    """One child process for one device, started now, read once."""

    def __init__(self, device: torch.device) -> None:
        self.result: MappedMemory | None = None
        self._lock = threading.Lock()
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(device)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        except OSError as exc:  # no fork/exec here: nothing learned, so no mapping
            self._proc = None
            self.result = MappedMemory(False, f"the mapped-memory probe could not start a child process ({exc})")

    def wait(self, timeout: float) -> MappedMemory:
        with self._lock:
            if self.result is None:
                self.result = self._collect(timeout)
            return self.result

    def _collect(self, timeout: float) -> MappedMemory:
        try:
            _, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return MappedMemory(False, f"the mapped-memory probe did not answer within {timeout:.0f} s")
        code = self._proc.returncode
        detail = (err or "").strip().splitlines()
        detail = f": {detail[-1]}" if detail else ""
        if code == EXIT_OK:
            return MappedMemory(True, "a child process read mapped host memory from a kernel")
        if code < 0:
            return MappedMemory(False, f"the mapped-memory probe was killed by signal {-code}{detail}")
        return MappedMemory(False, f"the mapped-memory probe failed (exit {code}){detail}")


_PROBES: dict[str, _Probe] = {}
_PROBES_LOCK = threading.Lock()


def _mode() -> str:
    mode = os.environ.get("OMNIKV_MAPPED_MEMORY", "probe").strip().lower() or "probe"
    if mode not in ("probe", "off", "on"):
        raise ConfigError(f"OMNIKV_MAPPED_MEMORY={mode!r} is unknown; use probe, off or on")
    return mode


def _device(device: torch.device) -> torch.device:
    """`cuda` and `cuda:<current>` are one device: one child, one answer."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def start_probe(device: torch.device) -> None:
    """Start the child for `device` (once per process) unless the answer is already known."""
    if _mode() != "probe":
        return
    device = _device(device)
    with _PROBES_LOCK:
        if str(device) not in _PROBES:
            _PROBES[str(device)] = _Probe(device)


def mapped_memory(device: torch.device, timeout: float = PROBE_TIMEOUT_S) -> MappedMemory:
    """Whether kernels on `device` may read mapped host memory (waits for the child once)."""
    mode = _mode()
    if mode == "off":
        return MappedMemory(False, "OMNIKV_MAPPED_MEMORY=off")
    if mode == "on":
        return MappedMemory(True, "OMNIKV_MAPPED_MEMORY=on (not probed)")
    device = _device(device)
    start_probe(device)
    return _PROBES[str(device)].wait(timeout)


def forget_probes() -> None:
    """Drop the cached answers (tests; a process that changed its CUDA environment)."""
    with _PROBES_LOCK:
        _PROBES.clear()
