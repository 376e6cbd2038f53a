"""Fidelity numbers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from omnikv.errors import InputError
from omnikv.eval import fidelity as F


def test_first_divergence_and_agreement():
    assert F.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert F.first_divergence([1, 2], [1, 2, 3]) == 2
    assert F.first_divergence([5, 6], [5, 6]) is None
    assert F.greedy_agreement([1, 2, 3, 4], [1, 9, 3]) == 0.5
    assert F.greedy_agreement([], []) == 1.0


def test_top1_and_kl():
    full = torch.tensor([[0.0, 0.0], [2.0, 1.0], [0.0, 5.0]])
    method = torch.tensor([[math.log(3.0), 0.0], [2.0, 1.0], [3.0, 0.0]])
    # argmax rows: full (0 [tie -> first], 0, 1), method (0, 0, 0)
    assert F.top1_agreement(full, method) == pytest.approx(2 / 3)
    kl = F.kl_per_position(full, method)
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3))
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    assert F.mean_kl(full, full) == pytest.approx(0.0, abs=1e-12)
    assert F.mean_kl(full, method) == pytest.approx(kl.mean().item())
    assert (F.kl_per_position(full, method) >= 0).all()


def test_perplexity():
    uniform = torch.zeros(3, 4)
    assert F.perplexity(uniform, [0, 1, 2]) == pytest.approx(4.0)
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p(0) = 3/4
    assert F.perplexity(logits, [0]) == pytest.approx(4 / 3)
    with pytest.raises(InputError):
        F.perplexity(uniform, [0, 1])


def test_shape_errors_and_report():
    with pytest.raises(InputError, match="same continuation"):
        F.mean_kl(torch.zeros(2, 3), torch.zeros(3, 3))
    rep = F.fidelity_report(torch.zeros(2, 3), torch.zeros(2, 3), [1, 2], [1, 3])
    assert rep == {"greedy_agreement": 0.5, "first_divergence": 1, "top1_agreement": 1.0,
                   "mean_kl": pytest.approx(0.0), "n_positions": 2}
