"""Where a decode step's time goes, when asked (`OMNIKV_VLLM_PROFILE=1`): seconds per part
("selection", "sparse attention"), summed in this process, and per part and layer (keys
"sparse attention@L", L the layer index) where the caller names its layer. The benchmark runs the engine in its own
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and reads `totals()` around its decode steps. Off, it
costs an empty context manager per filter and sparse layer call."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

ENV = "OMNIKV_VLLM_PROFILE"
_ON = os.environ.get(ENV, "") not in ("", "0")
_TOTALS: dict[str, float] = {}


@contextlib.contextmanager
def timed(part: str, layer: int | None = None) -> Iterator[None]:
    if not _ON:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        _TOTALS[part] = _TOTALS.get(part, 0.0) + took
        if layer is not None:
            key = f"{part}@{layer}"
            _TOTALS[key] = _TOTALS.get(key, 0.0) + took


def totals() -> dict[str, float]:
    """A copy of the seconds summed so far, by part."""
    return dict(_TOTALS)


def count(part: str, n: int = 1) -> None:
    """Add n to a counter (kept with the seconds; e.g. "rows with NaN scores"), when profiling."""
    if _ON:
        _TOTALS[part] = _TOTALS.get(part, 0.0) + n


def on() -> bool:
    """Whether this process profiles (OMNIKV_VLLM_PROFILE): callers skip work only a profile needs."""
    return _ON
