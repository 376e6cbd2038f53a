"""omnikv.eval.stats against values worked out by hand / from their definitions."""

from __future__ import annotations

import math

import pytest

from omnikv.eval.stats import bootstrap_mean_interval, paired_comparison, score_interval, sign_test, wilson_interval


def test_wilson_matches_the_closed_form():
    # 10 of 20: centre 0.5, half-width z*sqrt(0.25/20 + z^2/1600)/(1 + z^2/20) = 0.2009
    lo, hi = wilson_interval(10, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.2993, 0.7007)
    lo, hi = wilson_interval(0, 3)  # all wrong: the interval still reaches up to z^2/(n+z^2)
    z2 = 1.959963984540054 ** 2
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z2 / (3 + z2))
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + z2))
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32)  # both tails of Binomial(5, 1/2) at 0
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test(3, 3) == 1.0  # capped
    assert sign_test(2, 7) == sign_test(7, 2)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    xs = [0.0, 0.25, 0.5, 0.5, 1.0, 0.75, 0.25, 0.0]
    lo, hi = bootstrap_mean_interval(xs)
    assert lo < sum(xs) / len(xs) < hi and 0 <= lo and hi <= 1
    assert bootstrap_mean_interval(xs) == (lo, hi)
    assert bootstrap_mean_interval([0.5] * 4) == (0.5, 0.5)


def test_score_interval_picks_wilson_for_binary_scores():
    assert score_interval([1, 0, 1, 1])["interval"] == "wilson"
    ci = score_interval([1.0, 0.5, 0.0])
    assert ci["interval"] == "bootstrap" and 0 <= ci["low"] < 50 < ci["high"] <= 100


def test_paired_comparison_counts_and_tests():
    full = [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    method = [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    p = paired_comparison(method, full)
    assert (p["n"], p["same"], p["better"], p["worse"]) == (10, 6, 1, 3)
    assert p["sign_p"] == pytest.approx(2 * (1 + 4) / 16)
    assert p["mean_diff"] == pytest.approx(-20.0)
    assert p["diff_low"] < -20.0 < p["diff_high"]
    same = paired_comparison(full, full)
    assert (same["same"], same["sign_p"], same["diff_low"], same["diff_high"]) == (10, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ"):
        paired_comparison([1], [1, 0])
    assert not math.isnan(p["diff_low"])
