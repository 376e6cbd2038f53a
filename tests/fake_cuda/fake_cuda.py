"""A fake `torch.cuda` over a CPU-only PyTorch, to rehearse the GPU run in CI (tests only).

`install(scenario)` replaces, in this process only, the parts of `torch.cuda` (and the few tensor
entry points) that omnikv's CUDA path and `benchmarks/gpu/` touch. The library never installs it:
tests do, through a fixture (`installed`) or in a child process whose environment sets
`OMNIKV_FAKE_CUDA` (tests/fake_cuda/sitecustomize.py). Tensors stay on the CPU, which stands in for
`cuda:0` wherever a CUDA call takes a device.

What it keeps from the real thing, so that the mistakes a GPU run would die of die here too:

* only names real `torch.cuda` has are replaced (`install` raises on any other): code calling an
  API that does not exist fails with the AttributeError it would get on the GPU;
* device arguments are checked as PyTorch checks them (a CPU device is the one exception);
* `cudart()` has only the functions PyTorch binds; `cudaHostRegister` / `cudaHostUnregister`
  return a pybind11-style error enum (it equals only its own kind: compare `int(err)`), and a
  failed call leaves the runtime's "last error" set, which the next launch-checked call raises
  and clears: a kernel launch (here `_sleep`, work issued inside `torch.cuda.stream(...)`, and a
  mapped view, which a gather kernel reads next), not the calls that check only their own result;
* a kernel reading host memory through a mapped view where the scenario says mapping faults
  kills the context: that call and every later CUDA call raise, as after an illegal address;
* a mapped view (`torch.as_tensor` of an object with `__cuda_array_interface__`) is validated as
  PyTorch validates it and must lie inside registered, mapped host memory; it is a CPU tensor
  over the same bytes;
* pinned memory (`torch.empty(..., pin_memory=True)`, `Tensor.pin_memory()`, `Tensor.is_pinned()`),
  streams, events (with timing), memory statistics (from the process's resident set).

Scenarios (comma-separated): "on" (everything works), "register=refuse" (cudaHostRegister returns
an error), "pin=refuse" (the pinned allocator fails too), "mapped=fault" (a kernel reading mapped
host memory faults).
"""

from __future__ import annotations

import contextlib
import ctypes
import time
import types
import weakref
from dataclasses import dataclass, field

import torch

GIB = 2**30
TOTAL_MEMORY = 16 * GIB  # what the fake card reports
ERROR_NAMES = {2: "cudaErrorMemoryAllocation", 700: "cudaErrorIllegalAddress", 712: "cudaErrorHostMemoryAlreadyRegistered",
               713: "cudaErrorHostMemoryNotRegistered", 801: "cudaErrorNotSupported"}


@dataclass
class State:
    scenario: set[str] = field(default_factory=set)
    last_error: int = 0  # the runtime's last error (consumed by the next launch-checked call)
    dead: str | None = None  # a sticky error: the context is gone
    registered: dict[int, tuple[int, int]] = field(default_factory=dict)  # ptr -> (nbytes, flags)
    pinned: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # pinned-allocator tensors
    peak: int = 0
    current_stream: FakeStream | None = None
    calls: dict[str, int] = field(default_factory=dict)


STATE = State()


class CudaError(int):
    """What PyTorch's cudart binding returns: a pybind11 enum, equal only to its own kind."""

    def __eq__(self, other):
        return isinstance(other, CudaError) and int(self) == int(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = int.__hash__

    def __bool__(self):
        raise TypeError("a cudaError enum has no truth value here; compare int(err) with 0")


def _api(name: str, launch: bool = False) -> None:
    """Every fake CUDA call: a dead context raises. A `launch` (a call that launches kernels,
    which PyTorch checks with cudaGetLastError) also raises, and clears, a stale last error."""
    STATE.calls[name] = STATE.calls.get(name, 0) + 1
    if STATE.dead:
        raise RuntimeError(f"CUDA error: {STATE.dead} (the context is dead; fake_cuda, in {name})")
    if launch and STATE.last_error:
        code, STATE.last_error = STATE.last_error, 0
        raise RuntimeError(f"CUDA error: {ERROR_NAMES.get(code, code)} (a stale error an earlier call left "
                           f"behind, raised by the next launch check; fake_cuda, in {name})")
    STATE.peak = max(STATE.peak, _rss())


def _index(device=None) -> int:
    """The device index real torch.cuda would take from `device` (CPU stands in for cuda:0)."""
    if device is None:
        return 0
    if isinstance(device, int):
        idx = device
    else:
        dev = torch.device(device)
        if dev.type == "cpu":
            return 0
        if dev.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {dev}")
        idx = dev.index or 0
    if not 0 <= idx < 1:
        raise RuntimeError(f"CUDA error: invalid device ordinal {idx} (fake_cuda has one device)")
    return idx


def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


# -- streams and events ---------------------------------------------------------------------------------
class FakeStream:
    def __init__(self, device=None, priority: int = 0, **kwargs) -> None:
        _api("Stream")
        self.device_index = _index(device)
        self.priority = priority

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def wait_stream(self, stream) -> None:
        _api("Stream.wait_stream")
        if not isinstance(stream, FakeStream):
            raise TypeError(f"wait_stream expects a torch.cuda.Stream, got {type(stream).__name__}")

    def wait_event(self, event) -> None:
        _api("Stream.wait_event")
        if not isinstance(event, FakeEvent):
            raise TypeError(f"wait_event expects a torch.cuda.Event, got {type(event).__name__}")

    def record_event(self, event=None):
        event = event or FakeEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        _api("Stream.query")
        return True

    def synchronize(self) -> None:
        _api("Stream.synchronize")

    def __eq__(self, other) -> bool:
        return self is other

    __hash__ = object.__hash__


_DEFAULT = {}


def _default(idx: int) -> FakeStream:
    if idx not in _DEFAULT:
        _DEFAULT[idx] = FakeStream(idx)
    return _DEFAULT[idx]


class FakeEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        _api("Event")
        self.enable_timing = enable_timing
        self.t: float | None = None

    def record(self, stream=None) -> None:
        _api("Event.record")
        if stream is not None and not isinstance(stream, FakeStream):
            raise TypeError(f"Event.record expects a torch.cuda.Stream, got {type(stream).__name__}")
        self.t = time.perf_counter()

    def wait(self, stream=None) -> None:
        _api("Event.wait")

    def query(self) -> bool:
        _api("Event.query")
        return True

    def synchronize(self) -> None:
        _api("Event.synchronize")

    def elapsed_time(self, end: FakeEvent) -> float:
        _api("Event.elapsed_time")
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.t is None or end.t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return 1e3 * (end.t - self.t)


@contextlib.contextmanager
def _stream_ctx(stream):
    if stream is None:
        yield
        return
    _api("stream", launch=True)  # the kernels issued inside are launch-checked
    if not isinstance(stream, FakeStream):
        raise TypeError(f"torch.cuda.stream expects a torch.cuda.Stream, got {type(stream).__name__}")
    before, STATE.current_stream = STATE.current_stream, stream
    try:
        yield
    finally:
        STATE.current_stream = before
        _api("stream exit", launch=True)


def _current_stream(device=None) -> FakeStream:
    _api("current_stream")
    return STATE.current_stream or _default(_index(device))


def _default_stream(device=None) -> FakeStream:
    _api("default_stream")
    return _default(_index(device))


# -- the runtime binding -----------------------------------------------------------------------------------
def _register(ptr: int, size: int, flags: int) -> CudaError:
    STATE.calls["cudaHostRegister"] = STATE.calls.get("cudaHostRegister", 0) + 1
    if STATE.dead:
        return _fail(700)
    if "register=refuse" in STATE.scenario:
        return _fail(801)
    if any(p <= ptr < p + n or ptr <= p < ptr + size for p, (n, _) in STATE.registered.items()):
        return _fail(712)
    STATE.registered[int(ptr)] = (int(size), int(flags))
    return CudaError(0)


def _unregister(ptr: int) -> CudaError:
    STATE.calls["cudaHostUnregister"] = STATE.calls.get("cudaHostUnregister", 0) + 1
    if STATE.registered.pop(int(ptr), None) is None:
        return _fail(713)
    return CudaError(0)


def _fail(code: int) -> CudaError:
    STATE.last_error = code  # what cudaGetLastError would return next
    return CudaError(code)


class _ErrorEnum:
    success = CudaError(0)


def _cudart():
    _api("cudart")
    return types.SimpleNamespace(
        cudaError=_ErrorEnum,
        cudaHostRegister=_register,
        cudaHostUnregister=_unregister,
        cudaGetErrorString=lambda err: ERROR_NAMES.get(int(err), f"error {int(err)}"),
        cudaMemGetInfo=lambda device: _mem_get_info(device),
        cudaProfilerStart=lambda: CudaError(0),
        cudaProfilerStop=lambda: CudaError(0),
    )


def _registered_range(ptr: int, nbytes: int, mapped: bool) -> bool:
    for p, (n, flags) in STATE.registered.items():
        if p <= ptr and ptr + nbytes <= p + n and (not mapped or flags & 2):
            return True
    return False


# -- memory ------------------------------------------------------------------------------------------------
def _mem_get_info(device=None) -> tuple[int, int]:
    _api("mem_get_info")
    _index(device)
    return max(TOTAL_MEMORY - _rss(), 0), TOTAL_MEMORY


def _memory_allocated(device=None) -> int:
    _api("memory_allocated")
    _index(device)
    return _rss()


def _max_memory_allocated(device=None) -> int:
    _api("max_memory_allocated")
    _index(device)
    return STATE.peak


def _reset_peak(device=None) -> None:
    _api("reset_peak_memory_stats")
    _index(device)
    STATE.peak = _rss()


def _memory_stats(device=None) -> dict[str, int]:
    _api("memory_stats")
    return {"allocated_bytes.all.current": _rss(), "allocated_bytes.all.peak": STATE.peak}


@dataclass
class _Props:
    name: str = "Fake CUDA device (fake_cuda rehearsal)"
    total_memory: int = TOTAL_MEMORY
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 4
    L2_cache_size: int = 50 * 2**20


# -- tensors: pinned memory and mapped views ---------------------------------------------------------------
_REAL: dict[str, object] = {}


def _empty(*args, pin_memory: bool = False, **kwargs):
    if not pin_memory:
        return _REAL["empty"](*args, **kwargs)
    _api("pinned allocator")
    if "pin=refuse" in STATE.scenario:
        raise RuntimeError("CUDA error: cudaErrorMemoryAllocation (fake_cuda: the pinned allocator refused)")
    t = _REAL["empty"](*args, **kwargs)
    STATE.pinned.add(t)
    return t


def _pin_memory(self, device=None):
    _api("Tensor.pin_memory")
    if "pin=refuse" in STATE.scenario:
        raise RuntimeError("CUDA error: cudaErrorMemoryAllocation (fake_cuda: the pinned allocator refused)")
    t = self.clone()
    STATE.pinned.add(t)
    return t


def _is_pinned(self, device=None) -> bool:
    if self.device.type != "cpu":
        return False
    if any(t.untyped_storage().data_ptr() == self.untyped_storage().data_ptr() for t in STATE.pinned):
        return True
    return _registered_range(self.untyped_storage().data_ptr(), max(self.untyped_storage().nbytes(), 1), mapped=False)


def _as_tensor(data, dtype=None, device=None):
    iface = getattr(data, "__cuda_array_interface__", None)
    if iface is None:
        return _REAL["as_tensor"](data, dtype=dtype, device=device)
    _api("as_tensor(__cuda_array_interface__)", launch=True)  # a gather kernel reads it next
    _index(device)
    if not isinstance(iface, dict):
        raise TypeError("`__cuda_array_interface__` must be a dict")
    for key in ("shape", "typestr", "data"):
        if key not in iface:
            raise TypeError(f"attribute `{key}` must exist")
    shape, ptr_ro = tuple(iface["shape"]), iface["data"]
    if not isinstance(ptr_ro, tuple) or len(ptr_ro) != 2:
        raise TypeError("`data` must be a 2-tuple of (int, bool)")
    ptr, read_only = ptr_ro
    if read_only:
        raise TypeError("the read only flag is not supported, should always be False")
    if iface.get("strides") is not None:
        raise NotImplementedError("fake_cuda: strided __cuda_array_interface__ views are not modelled")
    np_dtype = __import__("numpy").dtype(iface["typestr"])
    nbytes = int(np_dtype.itemsize * (__import__("math").prod(shape)))
    if "mapped=fault" in STATE.scenario or not _registered_range(int(ptr), nbytes, mapped=True):
        # On the GPU the view builds and the first kernel reading it faults: sticky.
        STATE.dead = "cudaErrorIllegalAddress: an illegal memory access was encountered"
    buf = type("MappedBytes", (ctypes.c_uint8 * nbytes,), {}).from_address(int(ptr))
    buf.owner = data  # PyTorch keeps the interface object alive as long as the view's storage
    out = torch.frombuffer(buf, dtype=torch.uint8)
    np_to_torch = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if np_dtype.kind != "u" or np_dtype.itemsize != 1:
        out = out.view(np_to_torch[np_dtype.itemsize])
    out = out.view(shape)
    return out if dtype is None else out.to(dtype)


# -- install -----------------------------------------------------------------------------------------------
def _set_device(device) -> None:
    _api("set_device")
    _index(device)


def _synchronize(device=None) -> None:
    _api("synchronize")
    _index(device)


def _current_device() -> int:
    _api("current_device")
    return 0


def _device_properties(device=None) -> _Props:
    _api("get_device_properties")
    _index(device)
    return _Props()


def _is_capturing() -> bool:
    _api("is_current_stream_capturing")
    return False


def _sleep(cycles: int) -> None:
    _api("_sleep (a launch-checked kernel)", launch=True)


_RNG_STATE = {}


def _get_rng_state(device="cuda"):
    _api("get_rng_state")
    return _RNG_STATE.get(_index(device), torch.zeros(16, dtype=torch.uint8)).clone()


def _set_rng_state(new_state, device="cuda") -> None:
    _api("set_rng_state")
    if not isinstance(new_state, torch.Tensor) or new_state.dtype != torch.uint8:
        raise TypeError("set_rng_state expects a torch.ByteTensor")
    _RNG_STATE[_index(device)] = new_state.clone()


def _replacements() -> dict[str, object]:
    return {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 1,
        "current_device": _current_device,
        "set_device": _set_device,
        "get_device_name": lambda device=None: _device_properties(device).name,
        "get_device_properties": _device_properties,
        "get_device_capability": lambda device=None: (_device_properties(device).major, _device_properties(device).minor),
        "is_bf16_supported": lambda *a, **k: True,
        "synchronize": _synchronize,
        "empty_cache": lambda: _api("empty_cache"),
        "mem_get_info": _mem_get_info,
        "memory_allocated": _memory_allocated,
        "max_memory_allocated": _max_memory_allocated,
        "reset_peak_memory_stats": _reset_peak,
        "memory_stats": _memory_stats,
        "Stream": FakeStream,
        "Event": FakeEvent,
        "stream": _stream_ctx,
        "current_stream": _current_stream,
        "default_stream": _default_stream,
        "cudart": _cudart,
        "is_current_stream_capturing": _is_capturing,
        "_sleep": _sleep,
        "get_rng_state": _get_rng_state,  # dynamo saves and restores it around tracing
        "set_rng_state": _set_rng_state,
        "manual_seed": lambda seed: _api("manual_seed"),  # torch.manual_seed seeds CUDA too
        "manual_seed_all": lambda seed: _api("manual_seed_all"),
    }


def install(scenario: str = "on") -> None:
    """Replace torch.cuda's entry points with the fake, for this process (see the module docstring)."""
    if _REAL:
        STATE.scenario = _parse(scenario)
        return
    fakes = _replacements()
    missing = [name for name in fakes if not hasattr(torch.cuda, name)]
    if missing:  # the fake must not invent API the real torch.cuda lacks
        raise AttributeError(f"fake_cuda would add names real torch.cuda does not have: {missing}")
    STATE.scenario = _parse(scenario)
    for name, fake in fakes.items():
        _REAL["cuda." + name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, fake)
        for mod in (torch.cuda.memory, torch.cuda.streams, torch.cuda.random):
            if hasattr(mod, name):
                setattr(mod, name, fake)
    if torch.version.cuda is not None:
        # A CUDA build of PyTorch on this GPU-less machine (the GPU image's torch, rehearsed in a side
        # venv): torch's own internals ask torch.accelerator (dynamo tracks the current stream
        # through it), which would reach the absent driver. Answer as a CPU build does, so that
        # both builds rehearse the same path.
        _REAL["accelerator.is_available"] = torch.accelerator.is_available
        torch.accelerator.is_available = lambda: False
    _REAL["empty"], _REAL["as_tensor"] = torch.empty, torch.as_tensor
    _REAL["Tensor.pin_memory"], _REAL["Tensor.is_pinned"] = torch.Tensor.pin_memory, torch.Tensor.is_pinned
    torch.empty, torch.as_tensor = _empty, _as_tensor
    torch.Tensor.pin_memory, torch.Tensor.is_pinned = _pin_memory, _is_pinned


def uninstall() -> None:
    """Put the real entry points back and forget the fake's state."""
    global STATE
    if not _REAL:
        return
    for key, real in list(_REAL.items()):
        if key.startswith("cuda."):
            name = key[len("cuda."):]
            setattr(torch.cuda, name, real)
            for mod in (torch.cuda.memory, torch.cuda.streams, torch.cuda.random):
                if hasattr(mod, name):
                    setattr(mod, name, real)
    if "accelerator.is_available" in _REAL:
        torch.accelerator.is_available = _REAL["accelerator.is_available"]
    torch.empty, torch.as_tensor = _REAL["empty"], _REAL["as_tensor"]
    torch.Tensor.pin_memory, torch.Tensor.is_pinned = _REAL["Tensor.pin_memory"], _REAL["Tensor.is_pinned"]
    _REAL.clear()
    _DEFAULT.clear()
    STATE = State()


def _parse(scenario: str) -> set[str]:
    known = {"on", "1", "register=refuse", "pin=refuse", "mapped=fault"}
    parts = {p.strip() for p in scenario.split(",") if p.strip()}
    unknown = parts - known
    if unknown:
        raise ValueError(f"fake_cuda: unknown scenario {sorted(unknown)}; known: {sorted(known)}")
    return parts
