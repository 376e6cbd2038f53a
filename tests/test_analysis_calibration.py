"""Layer layout, filter-layer search (planted structure, DP == exhaustive), presets, telemetry."""

from __future__ import annotations

import json

import pytest
import torch

from omnikv.hf.compat import cache_kwargs

from omnikv.analysis.coverage import coverage_matrix
from omnikv.analysis.layout import layer_layout, paper_style_filters, score_layout
from omnikv.analysis.preset import PRESET_KEYS, make_preset, write_preset
from omnikv.analysis.search import choose_filter_layers, default_max_dense
from omnikv.algorithm.telemetry import summarize_telemetry
from omnikv.errors import ConfigError, InputError


def test_layout_matches_method_md_example():
    # Llama-3-8B, L = {2, 8, 18}, w = 1: dense = 0,1,2,3,8,9,18,19; 24 sparse layers.
    lay = layer_layout([2, 8, 18], 1, 32)
    assert lay.dense_layers == [0, 1, 2, 3, 8, 9, 18, 19]
    assert len(lay.sparse_layers) == 24
    assert lay.source[4] == 2 and lay.source[17] == 8 and lay.source[31] == 18
    with pytest.raises(ConfigError, match="increasing"):
        layer_layout([8, 2], 1, 32)
    with pytest.raises(ConfigError, match="0..31"):
        layer_layout([2, 40], 1, 32)


def test_score_layout_by_hand():
    cov = torch.tensor(
        [[1.0, 0.9, 0.8, 0.7], [0.0, 1.0, 0.6, 0.5], [0.0, 0.0, 1.0, 0.4], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    s = score_layout(cov, [1], 0)  # layer 0 dense, 1 filter, 2 and 3 sparse from 1
    assert (s.num_dense, s.num_sparse) == (2, 2)
    assert s.mean_sparse_coverage == pytest.approx(0.55)
    assert s.missed_mass == pytest.approx(0.9)
    assert s.mean_all_coverage == pytest.approx(1 - 0.9 / 4)


def _planted_attention(seed: int = 0):
    """12 layers: 0-1 attend at random; blocks 2-5, 6-8, 9-11 each share one set of important
    tokens (different per block), with per-layer noise. Returns scores (S, L, H, P), probs."""
    g = torch.Generator().manual_seed(seed)
    S, H, P = 4, 4, 64
    blocks = [(0, 1, None), (2, 5, 0), (6, 8, 1), (9, 11, 2)]
    base = torch.full((3, P), -2.0)
    for b in range(3):
        base[b, torch.randperm(P, generator=g)[:6]] = 6.0  # each block's own "needles"
    layers = []
    for lo, hi, b in blocks:
        for _ in range(lo, hi + 1):
            center = torch.zeros(S, H, P) if b is None else base[b].expand(S, H, P)
            layers.append(center + torch.randn(S, H, P, generator=g) * (3.0 if b is None else 0.5))
    logits = torch.stack(layers, dim=1)  # (S, L, H, P)
    return logits, torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("method", ["dp", "exhaustive", "greedy"])
def test_calibration_recovers_planted_blocks(method):
    scores, probs = _planted_attention()
    cov = coverage_matrix(scores, probs, k=6, head_reduce="max", num_kv_heads=2)
    # The filter must sit at the start of each block; the two noise layers stay dense.
    result = choose_filter_layers(cov, num_filters=3, num_wait=0, method=method, max_dense=5)
    assert result.filter_layers == [2, 6, 9]
    assert result.num_dense == 5
    # and the planted choice beats a shifted one by a wide margin
    assert result.mean_sparse_coverage > score_layout(cov, [3, 7, 10], 0).mean_sparse_coverage + 0.1


def test_dp_equals_exhaustive_and_greedy_is_never_better():
    g = torch.Generator().manual_seed(3)
    for trial in range(25):
        n = int(torch.randint(4, 11, (1,), generator=g))
        cov = torch.rand(n, n, generator=g, dtype=torch.float64)
        weights = torch.rand(n, generator=g, dtype=torch.float64) if trial % 2 else None
        for k in range(1, min(3, n) + 1):
            for wait in (0, 1, 2):
                cap = int(torch.randint(k, n + 1, (1,), generator=g))
                try:
                    best = choose_filter_layers(cov, k, wait, "exhaustive", cap, weights)
                except ConfigError:
                    with pytest.raises(ConfigError):
                        choose_filter_layers(cov, k, wait, "dp", cap, weights)
                    continue
                dp = choose_filter_layers(cov, k, wait, "dp", cap, weights)
                assert dp.missed_mass == pytest.approx(best.missed_mass, abs=1e-9)
                assert dp.num_dense <= cap
                try:
                    greedy = choose_filter_layers(cov, k, wait, "greedy", cap, weights)
                except ConfigError:
                    continue
                assert greedy.missed_mass >= best.missed_mass - 1e-9 and greedy.num_dense <= cap


def test_weights_change_the_choice():
    # Layer 3 is covered only by filter 1, layer 2 only by filter 2 (one filter, no wait, cap 3 dense).
    cov = torch.eye(4, dtype=torch.float64)
    cov[1, 3] = 1.0
    cov[2, 3] = 0.0
    cov[1, 2] = 0.0
    # filter 1: layers 0-1 dense, 2 and 3 sparse -> misses w2; filter 2: 0-2 dense, 3 sparse -> misses w3
    heavy3 = choose_filter_layers(cov, 1, 0, "dp", max_dense=3, weights=torch.tensor([1.0, 1.0, 0.1, 5.0]))
    heavy2 = choose_filter_layers(cov, 1, 0, "dp", max_dense=3, weights=torch.tensor([1.0, 1.0, 5.0, 0.1]))
    assert heavy3.filter_layers == [1]
    assert heavy2.filter_layers == [2]


def test_search_errors_and_defaults():
    cov = torch.rand(6, 6, dtype=torch.float64)
    with pytest.raises(ConfigError, match="num_filters"):
        choose_filter_layers(cov, 7, 0)
    with pytest.raises(ConfigError, match="method"):
        choose_filter_layers(cov, 2, 0, method="anneal")
    with pytest.raises(ConfigError, match="dense"):
        choose_filter_layers(cov, 3, 1, max_dense=3)
    assert paper_style_filters(30, 3) == [2, 8, 18]
    assert default_max_dense(32, 3, 1) == 8
    short = paper_style_filters(6, 2)
    assert len(set(short)) == 2 and max(short) < 6


def test_preset_file_round_trips_through_the_core_config(tmp_path):
    preset = make_preset([3, 14, 21], 1, 256, 4, 64, "last", "max", "llama", 30)
    assert tuple(preset) == PRESET_KEYS
    path = write_preset(tmp_path / "p.json", preset)
    assert json.loads(path.read_text()) == preset
    config_mod = pytest.importorskip("omnikv.config")
    cfg = config_mod.OmniKVConfig.from_json(path)
    assert cfg.filter_layers == (3, 14, 21) and cfg.budget == 256 and cfg.num_wait_layers == 1
    with pytest.raises(ConfigError, match="selector"):
        make_preset([3], 1, 256, 4, 64, "nearest", "max", "llama", 30)
    with pytest.warns(UserWarning, match="fit inside the budget"):
        small = make_preset([3], 1, 8, 4, 60, "last", "max", "llama", 30)  # budget below sink + recent
    assert small["sink_tokens"] + small["recent_tokens"] == 8
    with pytest.raises(ConfigError, match="exactly"):
        write_preset(tmp_path / "q.json", {**preset, "extra": 1})


def test_summarize_telemetry():
    records = [
        {"step": 0, "layer": 5, "coverage": 0.9, "recall": 0.5},
        {"step": 1, "layer": 5, "coverage": 0.7, "recall": 0.7},
        {"step": 0, "layer": 4, "coverage": 0.8, "recall": 1.0},
    ]
    s = summarize_telemetry(records)
    assert s["num_records"] == 3
    assert s["mean_coverage"] == pytest.approx(0.8)
    assert s["mean_recall"] == pytest.approx(2.2 / 3)
    assert [p["layer"] for p in s["per_layer"]] == [4, 5]
    assert s["per_layer"][1]["mean_coverage"] == pytest.approx(0.8)
    assert s["per_layer"][1]["steps"] == 2
    assert summarize_telemetry([])["mean_coverage"] is None
    with pytest.raises(InputError, match="coverage"):
        summarize_telemetry([{"layer": 1, "coverage": 1.5, "recall": 0.2}])
    with pytest.raises(InputError, match="layer"):
        summarize_telemetry([{"layer": "x", "coverage": 0.5, "recall": 0.2}])


def test_summarize_telemetry_reads_the_omnikv_cache_records(tmp_path):
    # The records the core cache emits with telemetry on (one per sparse layer and decode step).
    methods = pytest.importorskip("omnikv.methods")
    testing = pytest.importorskip("omnikv.models.tiny")
    model = testing.tiny_model("llama", seed=0, num_hidden_layers=6)
    preset = write_preset(tmp_path / "p.json", make_preset([1], 0, 8, 2, 2, "last", "max", "llama", 6))
    method = methods.get_method("omnikv", preset=str(preset), telemetry=True)
    cache = method.make_cache(model)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=4, do_sample=False)
    records = cache.state.telemetry
    summary = summarize_telemetry(records)
    assert [p["layer"] for p in summary["per_layer"]] == [2, 3, 4, 5]  # sparse layers after filter 1
    assert summary["num_records"] == len(records) > 0
    assert 0.0 < summary["mean_coverage"] <= 1.0 + 1e-6 and 0.0 <= summary["mean_recall"] <= 1.0


def test_every_chosen_filter_serves_a_sparse_layer():
    """A filter on the last layer (or right before the next filter) selects for nobody: it is a
    dense layer in disguise, which the objective would reward for free. The search must not."""
    import torch

    from omnikv.analysis.search import choose_filter_layers, every_filter_serves

    n = 10
    cov = torch.full((n, n), 0.9)
    cov[:, n - 1] = 0.1  # the last layer is poorly covered by everyone: tempting to "filter" it
    from omnikv.errors import ConfigError

    for method in ("dp", "greedy", "exhaustive"):
        for wait in (0, 1):
            try:
                res = choose_filter_layers(cov, 3, wait, method=method, max_dense=8)
            except ConfigError:
                assert method == "greedy"  # greedy may box itself in; the exact searches may not
                continue
            assert every_filter_serves(res.filter_layers, wait, n), (method, wait, res.filter_layers)
    dp = choose_filter_layers(cov, 3, 1, method="dp", max_dense=8)
    ex = choose_filter_layers(cov, 3, 1, method="exhaustive", max_dense=8)
    assert dp.missed_mass == pytest.approx(ex.missed_mass)
