"""Choose filter layers from a coverage matrix.

Objective: minimise the attention mass the sparse layers miss, sum_j weight_j * (1 - coverage[f(j), j])
over sparse layers j (f(j) = nearest preceding filter), subject to at most `max_dense` dense layers.
At a fixed number of dense layers this is the same as maximising the mean coverage of the sparse
layers; a dense layer counts as fully covered, so without the cap "everything dense" would win.
The first filter L0 also decides how many leading layers stay dense.

"dp" is exact and fast; "exhaustive" enumerates every set (a check for small models); "greedy" adds
one filter at a time (a baseline, not guaranteed optimal).
"""

from __future__ import annotations

import itertools
import math

import torch

from omnikv.analysis.layout import LayoutScore, layer_layout, paper_style_filters, score_layout
from omnikv.errors import ConfigError

METHODS = ("dp", "greedy", "exhaustive")


def every_filter_serves(filters, wait: int, n: int) -> bool:
    """True when each filter has at least one sparse layer after its wait layers. A filter that
    serves none is just a dense layer in disguise (e.g. on the last layer), which the coverage
    objective would otherwise reward for free."""
    bounds = list(filters) + [n]
    return all(bounds[i + 1] > bounds[i] + wait + 1 for i in range(len(filters)))
_EXHAUSTIVE_LIMIT = 2_000_000


def _validate(coverage: torch.Tensor, num_filters: int, num_wait: int) -> int:
    if coverage.dim() != 2 or coverage.shape[0] != coverage.shape[1]:
        raise ConfigError(f"coverage must be a square (L, L) matrix, got {tuple(coverage.shape)}")
    n = coverage.shape[0]
    if not 1 <= num_filters <= n:
        raise ConfigError(f"num_filters must be in 1..{n} for a {n}-layer model, got {num_filters}")
    if num_wait < 0:
        raise ConfigError(f"num_wait must be >= 0, got {num_wait}")
    return n


def default_max_dense(num_layers: int, num_filters: int, num_wait: int) -> int:
    """Dense layers of the paper-style choice with the same number of filters: the cost to match."""
    return len(layer_layout(paper_style_filters(num_layers, num_filters), num_wait, num_layers).dense_layers)


def _dp(cov: list[list[float]], w: list[float], n: int, k: int, wait: int, max_dense: int) -> list[int] | None:
    # seg[a][b]: missed mass of the sparse layers between filter a and the next filter b (b = n: end)
    seg = [[0.0] * (n + 1) for _ in range(n)]
    for a in range(n):
        acc = 0.0
        for b in range(a + 1, n + 1):
            j = b - 1
            if j > a + wait:
                acc += w[j] * (1.0 - cov[a][j])
            seg[a][b] = acc
    inf = math.inf
    # best[m][a][d]: least missed mass with m+1 filters, the last at a, d dense layers before a
    best = [[[inf] * (max_dense + 1) for _ in range(n)] for _ in range(k)]
    parent: dict[tuple[int, int, int], tuple[int, int]] = {}
    for a in range(min(n, max_dense + 1)):
        best[0][a][a] = 0.0  # layers 0..a-1 dense
    for m in range(1, k):
        for a in range(n):
            for d in range(max_dense + 1):
                base = best[m - 1][a][d]
                if base == inf:
                    continue
                for b in range(a + wait + 2, n):  # filter a must serve a sparse layer
                    d2 = d + min(wait + 1, b - a)
                    if d2 > max_dense:
                        break  # d2 only grows with b
                    val = base + seg[a][b]
                    if val < best[m][b][d2]:
                        best[m][b][d2] = val
                        parent[(m, b, d2)] = (a, d)
    end = None
    end_val = inf
    for a in range(n):
        for d in range(max_dense + 1):
            if best[k - 1][a][d] == inf or d + min(wait + 1, n - a) > max_dense or n <= a + wait + 1:
                continue
            val = best[k - 1][a][d] + seg[a][n]
            if val < end_val - 1e-12:
                end, end_val = (a, d), val
    if end is None:
        return None
    layers = [end[0]]
    m, a, d = k - 1, end[0], end[1]
    while m > 0:
        a, d = parent[(m, a, d)]
        layers.append(a)
        m -= 1
    return layers[::-1]


def _greedy(coverage: torch.Tensor, k: int, wait: int, max_dense: int, weights) -> list[int] | None:
    chosen: list[int] = []
    n = coverage.shape[0]
    for step in range(k):
        remaining = k - step - 1
        best, best_val = None, math.inf
        for x in range(n):
            if x in chosen:
                continue
            cand = sorted(chosen + [x])
            if not every_filter_serves(cand, wait, n):  # adding filters can never repair this
                continue
            s = score_layout(coverage, cand, wait, weights)
            # leave room for the filters still to come (each brings itself + its wait layers)
            if s.num_dense + remaining * (wait + 1) > max_dense:
                continue
            if s.missed_mass < best_val - 1e-12:
                best, best_val = cand, s.missed_mass
        if best is None:
            return None
        chosen = best
    return chosen


def _exhaustive(coverage: torch.Tensor, k: int, wait: int, max_dense: int, weights) -> list[int] | None:
    n = coverage.shape[0]
    if math.comb(n, k) > _EXHAUSTIVE_LIMIT:
        raise ConfigError(
            f"exhaustive search over C({n}, {k}) = {math.comb(n, k)} sets is too large; use method='dp'"
        )
    best, best_val = None, math.inf
    for cand in itertools.combinations(range(n), k):
        if not every_filter_serves(cand, wait, n):
            continue
        s = score_layout(coverage, cand, wait, weights)
        if s.num_dense <= max_dense and s.missed_mass < best_val - 1e-12:
            best, best_val = list(cand), s.missed_mass
    return best


def choose_filter_layers(
    coverage: torch.Tensor,
    num_filters: int,
    num_wait: int,
    method: str = "dp",
    max_dense: int | None = None,
    weights: torch.Tensor | None = None,
) -> LayoutScore:
    """Pick `num_filters` filter layers for coverage (L, L) (rows select, columns attend).

    max_dense: most dense layers allowed (leading + filters + wait layers); default = as many as
    the paper-style choice with the same number of filters. weights: (L,) per-layer weights of
    the missed mass (default 1). Returns the chosen set scored on `coverage`.
    """
    n = _validate(coverage, num_filters, num_wait)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if max_dense is None:
        max_dense = default_max_dense(n, num_filters, num_wait)
    if weights is not None and tuple(weights.shape) != (n,):
        raise ConfigError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    if method == "dp":
        cov = coverage.to(torch.float64).tolist()
        w = [1.0] * n if weights is None else weights.to(torch.float64).tolist()
        layers = _dp(cov, w, n, num_filters, num_wait, max_dense)
    elif method == "greedy":
        layers = _greedy(coverage, num_filters, num_wait, max_dense, weights)
    else:
        layers = _exhaustive(coverage, num_filters, num_wait, max_dense, weights)
    if layers is None:
        raise ConfigError(
            f"no set of {num_filters} filter layers with {num_wait} wait layers fits in {max_dense} dense "
            f"layers; raise max_dense or lower num_filters / num_wait"
        )
    return score_layout(coverage, layers, num_wait, weights)
