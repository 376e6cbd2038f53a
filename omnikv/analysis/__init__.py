"""Attention-coverage analysis and automatic filter-layer calibration (see docs/analysis.md).

- `coverage`: coverage matrix between layers, its decay with distance, top-k Jaccard, mass split.
- `search`: `choose_filter_layers` (dp / greedy / exhaustive) under a dense-layer budget.
- `capture`: record a real model's decode-step attention logits (no model-code changes).
- `report`, `plots`: the `omnikv analyze` JSON report and PNGs; `preset`: calibrated preset files.
- `summarize_telemetry` (from the core, `omnikv.algorithm.telemetry`) for per-step selection records of real runs.
"""

from omnikv.analysis.coverage import (
    attention_from_qk,
    coverage_decay,
    coverage_matrices,
    coverage_matrix,
    mass_distribution,
    topk_jaccard,
)
from omnikv.analysis.layout import LayoutScore, layer_layout, paper_style_filters, score_layout
from omnikv.analysis.search import choose_filter_layers
from omnikv.algorithm.telemetry import summarize_telemetry

__all__ = [
    "LayoutScore",
    "attention_from_qk",
    "choose_filter_layers",
    "coverage_decay",
    "coverage_matrices",
    "coverage_matrix",
    "layer_layout",
    "mass_distribution",
    "paper_style_filters",
    "score_layout",
    "summarize_telemetry",
    "topk_jaccard",
]
