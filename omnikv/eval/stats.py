"""Uncertainty of eval scores: 95% intervals per cell and paired tests against full attention.

Pure Python on lists of per-sample scores in [0, 1] (no numpy/scipy), so reports need nothing
beyond the standard library and are reproducible bit for bit (the bootstrap is seeded).

* `score_interval`: Wilson score interval when every score is 0 or 1 (the binomial case, good
  at small n and at 0 % / 100 %, where a normal interval collapses), else a percentile bootstrap
  of the mean (partial-credit metrics such as `string_match_all`);
* `paired_comparison`: one method against full attention on the same samples: how many samples
  score the same / better / worse, an exact two-sided sign test on better vs worse (ties carry no
  information about the direction; on 0/1 scores this is the exact McNemar test), and the mean
  paired difference with a bootstrap 95% interval - the interval behind "within 1 point".
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}]; got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` (seeded: reproducible)."""
    if not values:
        raise ValueError("bootstrap_mean_interval needs at least one value")
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(math.floor(0.025 * (resamples - 1)))]
    hi = means[int(math.ceil(0.975 * (resamples - 1)))]
    return lo, hi


def score_interval(scores: Sequence[float]) -> dict[str, Any]:
    """{"low", "high"} (x100, 95%) and {"interval": "wilson" | "bootstrap"} of a cell's scores."""
    if not scores:
        raise ValueError("score_interval needs at least one score")
    if all(s in (0, 1) for s in scores):
        lo, hi = wilson_interval(int(sum(scores)), len(scores))
        kind = "wilson"
    else:
        lo, hi = bootstrap_mean_interval(list(scores))
        kind = "bootstrap"
    return {"low": _points(lo), "high": _points(hi), "interval": kind}


def _points(fraction: float) -> float:
    """A share in [0, 1] as points x100, rounded to 1e-6 so that float noise (a Wilson bound of
    5.55e-15 instead of 0) never reaches a report."""
    return round(100.0 * fraction, 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def sign_test(better: int, worse: int) -> float:
    """Exact two-sided sign test p-value of `better` vs `worse` under p = 1/2 (1.0 when both 0)."""
    if better < 0 or worse < 0:
        raise ValueError("counts must be >= 0")
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(method: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """`method` against `reference` (full attention), sample by sample (same order, same samples).

    Returns n, same, better, worse, sign_p (exact two-sided), mean_diff and its bootstrap 95%
    interval diff_low / diff_high (x100 points: method minus reference)."""
    if len(method) != len(reference):
        raise ValueError(f"paired samples differ in number: {len(method)} vs {len(reference)}")
    if not method:
        raise ValueError("paired_comparison needs at least one pair")
    diffs = [m - r for m, r in zip(method, reference)]
    better = sum(1 for d in diffs if d > 0)
    worse = sum(1 for d in diffs if d < 0)
    lo, hi = bootstrap_mean_interval(diffs) if any(diffs) else (0.0, 0.0)
    return {
        "n": len(diffs), "same": len(diffs) - better - worse, "better": better, "worse": worse,
        "sign_p": sign_test(better, worse),
        "mean_diff": _points(sum(diffs) / len(diffs)), "diff_low": _points(lo), "diff_high": _points(hi),
    }
