"""Coverage metric: hand-computed example, head reductions, sink/recent, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from omnikv.analysis.coverage import coverage_decay, coverage_matrix, mass_distribution, topk_jaccard
from omnikv.analysis.selection_sets import reduce_heads, topk_indices
from omnikv.budget import Budget
from omnikv.errors import ConfigError, InputError


def _hand_example():
    # 1 step, 2 layers, 2 query heads sharing 1 KV head, P = 4 prompt keys + 1 generated key (T = 5).
    scores = torch.tensor(
        [
            [[4.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 0.0]],  # layer 0: max over heads -> [4, 3, 1, 0]
            [[0.0, 0.0, 5.0, 1.0], [0.0, 1.0, 0.0, 2.0]],  # layer 1: max over heads -> [0, 1, 5, 2]
        ]
    )
    probs = torch.tensor(
        [
            [[0.5, 0.1, 0.2, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1]],
            [[0.1, 0.1, 0.6, 0.1, 0.1], [0.2, 0.2, 0.1, 0.3, 0.2]],
        ]
    )
    return scores, probs


def test_coverage_matches_hand_computation():
    scores, probs = _hand_example()
    cov = coverage_matrix(scores, probs, k=2, head_reduce="max", num_kv_heads=1)
    # layer 0 keeps {0, 1} + generated 4; layer 1 keeps {2, 3} + generated 4.
    # cov[0,0] = mean(0.5+0.1+0.1, 0.1+0.6+0.1) = 0.75   cov[0,1] = mean(0.1+0.1+0.1, 0.2+0.2+0.2) = 0.45
    # cov[1,0] = mean(0.2+0.1+0.1, 0.1+0.1+0.1) = 0.35   cov[1,1] = mean(0.6+0.1+0.1, 0.1+0.3+0.2) = 0.70
    expected = torch.tensor([[0.75, 0.45], [0.35, 0.70]], dtype=torch.float64)
    assert torch.allclose(cov, expected, atol=1e-6)


def test_sink_and_recent_are_forced_inside_the_budget():
    scores, probs = _hand_example()
    # k=2 with sink 1 + recent 1: every layer keeps exactly {0, 3} whatever its scores say.
    cov = coverage_matrix(scores, probs, k=2, head_reduce="max", num_kv_heads=1, sink=1, recent=1)
    kept = torch.tensor([1, 0, 0, 1, 1], dtype=torch.float64)
    per_layer = (probs.double() * kept).sum(-1).mean(-1)  # (L,)
    assert torch.allclose(cov, per_layer.expand(2, 2), atol=1e-6)


def test_sum_and_per_kv_head_reductions_by_hand():
    # 4 query heads, 2 KV heads (heads 0,1 -> kv 0; heads 2,3 -> kv 1), P = 3.
    s = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    assert torch.equal(reduce_heads(s, "sum", 2), torch.tensor([[5.0, 4.0, 2.0]]))
    assert torch.equal(reduce_heads(s, "max", 2), torch.tensor([[5.0, 3.0, 2.0]]))
    assert torch.equal(reduce_heads(s, "per_kv_head", 2), torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 2.0]]))
    idx = topk_indices(s, 1, "per_kv_head", 2)
    assert idx.squeeze(-1).tolist() == [0, 1]
    # per_kv_head coverage: heads 0,1 use {0}, heads 2,3 use {1}; probs chosen so each head differs.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])
    cov = coverage_matrix(s[None], probs[None], k=1, head_reduce="per_kv_head", num_kv_heads=2)
    assert cov.item() == pytest.approx((0.7 + 0.4 + 0.6 + 0.2) / 4)


def test_coverage_is_brute_force_mean_over_steps_and_heads():
    g = torch.Generator().manual_seed(1)
    S, L, H, P, T = 3, 4, 6, 20, 23
    scores = torch.randn(S, L, H, P, generator=g)
    probs = torch.softmax(torch.randn(S, L, H, T, generator=g), -1)
    cov = coverage_matrix(scores, probs, k=5, head_reduce="per_kv_head", num_kv_heads=3, sink=2, recent=3)
    ref = torch.zeros(L, L, dtype=torch.float64)
    for s in range(S):
        for i in range(L):
            for h in range(H):
                grp = scores[s, i, (h // 2) * 2 : (h // 2) * 2 + 2].amax(0).clone()
                grp[:2] = math.inf
                grp[P - 3 :] = math.inf
                keep = set(grp.topk(5).indices.tolist()) | set(range(P, T))
                for j in range(L):
                    ref[i, j] += sum(float(probs[s, j, h, t]) for t in keep)
    assert torch.allclose(cov, ref / (S * H), atol=1e-6)


def test_full_budget_covers_everything_and_more_budget_never_hurts():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 4, 30, generator=g)
    probs = torch.softmax(torch.randn(2, 3, 4, 32, generator=g), -1)
    full = coverage_matrix(scores, probs, k=30, head_reduce="sum", num_kv_heads=2)
    assert torch.allclose(full, torch.ones(3, 3, dtype=torch.float64), atol=1e-6)
    small = coverage_matrix(scores, probs, k=5, head_reduce="max", num_kv_heads=2)
    big = coverage_matrix(scores, probs, k=10, head_reduce="max", num_kv_heads=2)
    assert bool((big >= small - 1e-12).all())


def test_selected_budget_matches_config_rules():
    assert Budget(0.1).selected(95) == 10  # rounded up
    assert Budget(8).selected(100, sink=4, recent=64) == 68  # never below the always-kept tokens
    assert Budget(500).selected(100) == 100
    with pytest.raises(ConfigError):
        Budget(1.5)
    with pytest.raises(ConfigError):
        Budget(0)


def test_bad_shapes_and_head_counts_are_clear_errors():
    with pytest.raises(InputError, match="disagree"):
        coverage_matrix(torch.zeros(2, 3, 4, 10), torch.zeros(2, 3, 2, 10), k=2)
    with pytest.raises(InputError, match="KV heads"):
        coverage_matrix(torch.zeros(1, 2, 3, 10), torch.zeros(1, 2, 3, 10), k=2, num_kv_heads=2)
    with pytest.raises(ConfigError, match="head_reduce"):
        coverage_matrix(torch.zeros(1, 2, 2, 10), torch.zeros(1, 2, 2, 10), k=2, head_reduce="mean")


def test_decay_jaccard_and_mass_distribution():
    cov = torch.tensor([[1.0, 0.8, 0.4], [0.0, 0.9, 0.6], [0.0, 0.0, 0.7]], dtype=torch.float64)
    assert coverage_decay(cov) == pytest.approx([(1.0 + 0.9 + 0.7) / 3, 0.7, 0.4])

    # layer 0: same top-2 at both steps (Jaccard 1); layer 1: {0,1} -> {1,2} (Jaccard 1/3).
    scores = torch.tensor(
        [[[[3.0, 2.0, 0.0, 0.0]], [[3.0, 2.0, 0.0, 0.0]]], [[[3.0, 2.0, 0.0, 0.0]], [[0.0, 3.0, 2.0, 0.0]]]]
    )  # (S=2, L=2, H=1, P=4)
    assert topk_jaccard(scores, 2).tolist() == pytest.approx([1.0, 1 / 3])

    probs = torch.tensor([[[[0.4, 0.1, 0.1, 0.2, 0.2]]]])  # P=4, one generated key
    mass = mass_distribution(probs, prompt_len=4, sink=1, recent=1)
    assert {k: round(float(v[0]), 6) for k, v in mass.items()} == {
        "sink": 0.4, "middle": 0.2, "recent": 0.2, "generated": 0.2
    }


def test_attention_from_qk_matches_a_per_head_loop():
    from omnikv.analysis.coverage import attention_from_qk

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 8, generator=g)  # S=2, L=3, H=4, D=8
    k = torch.randn(2, 3, 2, 11, 8, generator=g)  # H_kv=2, T=11
    scores, probs = attention_from_qk(q, k, 0.25, prompt_len=9)
    assert scores.shape == (2, 3, 4, 9) and probs.shape == (2, 3, 4, 11)
    for s in range(2):
        for layer in range(3):
            for h in range(4):
                logits = (k[s, layer, h // 2] @ q[s, layer, h]) * 0.25
                assert torch.allclose(scores[s, layer, h], logits[:9], atol=1e-5)
                assert torch.allclose(probs[s, layer, h], torch.softmax(logits, 0), atol=1e-6)
    with pytest.raises(InputError):
        attention_from_qk(q, k[:, :, :, :, :4], 0.25, prompt_len=9)
