"""Summary of selection telemetry recorded during real runs (generate / eval / bench).

The OmniKV cache, when telemetry is on, emits one record per sparse layer per decode step:
    {"step": int, "layer": int, "coverage": float, "recall": float}
coverage = share of the layer's attention mass on the keys it attended (selected + kept + generated);
recall = |selected prompt set & the layer's own top-k| / k. "step" is optional here.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from omnikv.errors import InputError


def _value(rec: Mapping[str, Any], name: str, i: int) -> float:
    v = rec.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0 + 1e-6:
        raise InputError(f"telemetry record {i}: {name!r} must be a number in [0, 1], got {v!r}")
    return float(v)


def summarize_telemetry(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per sparse layer mean coverage and mean recall, plus the means over all records.

    Returns {"num_records", "mean_coverage", "mean_recall", "per_layer": [{"layer", "steps",
    "mean_coverage", "mean_recall"} sorted by layer]}; means are None when there are no records.
    """
    sums: dict[int, list[float]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise InputError(f"telemetry record {i} must be a mapping, got {type(rec).__name__}")
        layer = rec.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise InputError(f"telemetry record {i}: 'layer' must be a non-negative int, got {layer!r}")
        acc = sums.setdefault(layer, [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += _value(rec, "coverage", i)
        acc[2] += _value(rec, "recall", i)
    n = sum(a[0] for a in sums.values())
    per_layer = [
        {"layer": layer, "steps": a[0], "mean_coverage": a[1] / a[0], "mean_recall": a[2] / a[0]}
        for layer, a in sorted(sums.items())
    ]
    return {
        "num_records": n,
        "mean_coverage": sum(a[1] for a in sums.values()) / n if n else None,
        "mean_recall": sum(a[2] for a in sums.values()) / n if n else None,
        "per_layer": per_layer,
    }
