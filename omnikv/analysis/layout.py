"""Layer roles for a filter set, and how well a coverage matrix says that set would do.

Roles (as `omnikv.algorithm.roles.plan_layers`; docs/how-it-works.md), for N layers, filters L0 < L1 < ... and w wait layers:
layers before L0 dense; each filter dense; the w layers after each filter dense; every other layer
sparse, using the nearest preceding filter's selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Roles of every layer: `source[j]` is the filter layer a sparse layer j reads, None if dense."""

    filter_layers: tuple[int, ...]
    num_wait_layers: int
    num_layers: int
    source: tuple[int | None, ...]

    @property
    def dense_layers(self) -> list[int]:
        return [j for j, s in enumerate(self.source) if s is None]

    @property
    def sparse_layers(self) -> list[int]:
        return [j for j, s in enumerate(self.source) if s is not None]


def layer_layout(filter_layers: list[int] | tuple[int, ...], num_wait: int, num_layers: int) -> Layout:
    """Assign roles; raises ConfigError for unsorted, duplicate or out-of-range filter layers."""
    filters = tuple(int(f) for f in filter_layers)
    if not filters:
        raise ConfigError("at least one filter layer is needed")
    if list(filters) != sorted(set(filters)):
        raise ConfigError(f"filter layers must be strictly increasing, got {list(filters)}")
    if filters[0] < 0 or filters[-1] >= num_layers:
        raise ConfigError(f"filter layers {list(filters)} must lie in 0..{num_layers - 1}")
    if num_wait < 0:
        raise ConfigError(f"num_wait_layers must be >= 0, got {num_wait}")
    source: list[int | None] = [None] * num_layers
    current = None
    for j in range(filters[0], num_layers):
        if j in filters:
            current = j
        elif j > current + num_wait:
            source[j] = current
    return Layout(filters, num_wait, num_layers, tuple(source))


@dataclass(frozen=True)
class LayoutScore:
    filter_layers: list[int]
    num_dense: int
    num_sparse: int
    mean_sparse_coverage: float  # mean (weighted) coverage over sparse layers: what selection keeps
    mean_all_coverage: float  # mean over all layers with dense layers counted as 1 (weighted)
    missed_mass: float  # sum over sparse layers of weight * (1 - coverage): what the search minimises

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_layout(
    coverage: torch.Tensor,
    filter_layers: list[int] | tuple[int, ...],
    num_wait: int,
    weights: torch.Tensor | None = None,
) -> LayoutScore:
    """Evaluate one filter set on a coverage matrix (L, L); `weights` (L,) weigh layers (default 1)."""
    n = coverage.shape[0]
    layout = layer_layout(filter_layers, num_wait, n)
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    sparse = layout.sparse_layers
    cov = [float(coverage[layout.source[j], j]) for j in sparse]
    missed = sum(float(w[j]) * (1.0 - c) for j, c in zip(sparse, cov))
    sparse_weight = sum(float(w[j]) for j in sparse)
    return LayoutScore(
        filter_layers=list(layout.filter_layers),
        num_dense=len(layout.dense_layers),
        num_sparse=len(sparse),
        mean_sparse_coverage=(sum(float(w[j]) * c for j, c in zip(sparse, cov)) / sparse_weight)
        if sparse_weight
        else 1.0,
        mean_all_coverage=1.0 - missed / float(w.sum()),
        missed_mass=missed,
    )


def paper_style_filters(num_layers: int, num_filters: int = 3) -> list[int]:
    """The paper's Llama-3-8B choice {2, 8, 18} (of 32 layers), kept as is where it fits, else rescaled.

    For another number of filters the paper's first filter (layer 2) is kept and the rest spread
    like the paper's: evenly over the first ~60% of the model.
    """
    if num_filters < 1 or num_filters > num_layers:
        raise ConfigError(f"num_filters must be in 1..{num_layers}, got {num_filters}")
    if num_filters == 3 and num_layers >= 24:
        return [2, 8, 18]
    first = min(2, num_layers - num_filters)
    span = max(num_filters, round(18 / 32 * num_layers)) - first
    gap = span / max(1, num_filters - 1)
    layers = [first + round(i * gap) for i in range(num_filters)]
    # rounding can collide on short models: push duplicates forward
    out: list[int] = []
    for f in layers:
        f = max(f, out[-1] + 1) if out else f
        out.append(min(f, num_layers - 1))
    if len(set(out)) != len(out):
        out = list(range(first, first + num_filters))
    return out
