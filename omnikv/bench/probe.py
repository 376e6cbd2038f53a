"""Measurement helpers for `omnikv bench`: a decode-step breakdown and memory probes.

The breakdown wraps a few of *our own* functions (the selector, the segment load, the SDPA call our
attention function makes) and the cache instance's `update`, only inside the bench process and only
while a `StepBreakdown` is active. Transformers' code is never patched. Times are *exclusive*: a
wrapped call inside another wrapped call is charged to the inner category only, so the categories
never double count and `rest = total - sum(categories)` is what none of them covers (the linear
layers, norms, RoPE, the LM head, Python overhead).

On CUDA the wrappers synchronise at each boundary so that GPU time lands in the right category;
that serialises the copy stream with compute, so breakdown steps are timed separately from the
clean steps that give ms/token.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CATEGORIES = ("selection", "gather", "attention", "kv_update")

# Function names -> category, wrapped wherever an `omnikv.*` module binds them (callers look them
# up as module globals at call time). Methods added later are covered as long as they use these.
_FUNCTION_TARGETS = {
    "filter_scores": "selection",  # OmniKV's Context Selector
    "scores_from_logits": "selection",
    "select_topk": "selection",
    "page_scores": "selection",  # Quest's page scoring
    "gather_rows": "gather",
    "sdpa_attention_forward": "attention",
    "sdpa_attention": "attention",  # omnikv.hf.attention's wrapper (GQA packing kept when compiled)
}
# (module, class, method, category)
_METHOD_TARGETS = (
    ("omnikv.offload.segment", "Segment", "load", "gather"),  # every gather strategy, the static one too
    # A filter layer computes its decode attention itself (its logits double as selector scores).
    ("omnikv.algorithm.layers", "FilterLayer", "_attend_and_select", "attention"),
)


class StepBreakdown:
    """Context manager: per-category exclusive time (seconds) of the code run inside it.

    Example:
        probe = StepBreakdown(sync=is_cuda)
        with probe.watch(cache):
            t0 = time.perf_counter(); step(); total = time.perf_counter() - t0
        parts = probe.take()   # {"selection": s, "gather": s, "attention": s, "kv_update": s}
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.acc = dict.fromkeys(CATEGORIES, 0.0)
        self._stack: list[list[float]] = []  # [start, child_time] per open wrapped call
        self._saved: list[tuple[Any, str, Any, bool]] = []

    # -- the wrapper ---------------------------------------------------------------------------
    def _wrap(self, fn: Callable, category: str) -> Callable:
        probe = self

        def timed(*args, **kwargs):
            if probe.sync:
                torch.cuda.synchronize()
            frame = [time.perf_counter(), 0.0]
            probe._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                if probe.sync:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - frame[0]
                probe._stack.pop()
                probe.acc[category] += elapsed - frame[1]
                if probe._stack:
                    probe._stack[-1][1] += elapsed

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def _patch(self, owner: Any, name: str, category: str) -> None:
        """Replace `owner.name` by a timed wrapper; remember how to undo it.

        owner: a module (function attribute), a class (plain function in its __dict__, so the
        wrapper still binds as a method) or an instance (bound method, shadowed by an instance
        attribute that `uninstall` deletes again).
        """
        own = name in getattr(owner, "__dict__", {})
        original = owner.__dict__[name] if own else getattr(owner, name, None)
        if original is None:
            return
        self._saved.append((owner, name, original, own))
        setattr(owner, name, self._wrap(original, category))

    def install(self, caches: list[Any]) -> None:
        """Wrap the target functions and every cache's `update` (instance attribute)."""
        if self._saved:
            return
        importlib.import_module("omnikv.algorithm.cache")
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith("omnikv.") or mod_name.startswith("omnikv.bench"):
                continue
            for attr, cat in _FUNCTION_TARGETS.items():
                if callable(mod.__dict__.get(attr)):
                    self._patch(mod, attr, cat)
        for mod_name, cls_name, attr, cat in _METHOD_TARGETS:
            cls = getattr(importlib.import_module(mod_name), cls_name, None)
            if cls is not None and attr in cls.__dict__:
                self._patch(cls, attr, cat)
        for cache in caches:
            self._patch(cache, "update", "kv_update")

    def uninstall(self) -> None:
        for owner, name, original, own in reversed(self._saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()

    def take(self) -> dict[str, float]:
        """The accumulated seconds per category since the last `take` (then reset)."""
        out, self.acc = self.acc, dict.fromkeys(CATEGORIES, 0.0)
        return out

    def __enter__(self) -> StepBreakdown:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


# -- memory -----------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process, bytes (0 where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss() -> int:
    """Peak RSS since the last `reset_peak_rss` (or process start), bytes."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux `clear_refs` 5); False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryWindow:
    """Peak host RSS and device memory of one method's fill + warm-up, *as if run alone*.

    Other methods' caches are alive at the same time (methods are interleaved), so what they hold
    when the window opens is subtracted from the peaks: peak = process peak - (held at start -
    held by the process before any cache was built).
    """

    def __init__(self, baseline_rss: int, baseline_device: int, device: torch.device) -> None:
        self.baseline_rss = baseline_rss
        self.baseline_device = baseline_device
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> MemoryWindow:
        self.others_rss = max(0, current_rss() - self.baseline_rss)
        self.rss_reset = reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start_device = torch.cuda.memory_allocated(self.device)
            self.others_device = max(0, self.start_device - self.baseline_device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_rss = peak_rss() - (self.others_rss if self.rss_reset else 0)
        self.peak_device = self.resident_device = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_device = torch.cuda.max_memory_allocated(self.device) - self.others_device
            # what the method still holds once warm (its cache, buffers included), measured
            self.resident_device = torch.cuda.memory_allocated(self.device) - self.start_device
