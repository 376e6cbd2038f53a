"""How closely a method follows full attention, from teacher-forced logits and greedy outputs.

Both logit tensors come from `omnikv.decoding.generation.teacher_forced_logits(model, prompt_ids,
continuation_ids, method)` with the *same* continuation (full attention's greedy output), so row i
of each is the next-token distribution after the same prefix. Pure tensor functions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from omnikv.errors import InputError


def _check_pair(full: torch.Tensor, method: torch.Tensor) -> None:
    if full.dim() != 2 or method.dim() != 2:
        raise InputError(f"logits must be (N, vocab) tensors, got shapes {tuple(full.shape)} and {tuple(method.shape)}")
    if full.shape != method.shape:
        raise InputError(f"logit shapes differ: full {tuple(full.shape)} vs method {tuple(method.shape)}; "
                         "compute both with the same continuation")


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Index of the first position where the two token lists differ (a length mismatch counts at
    the shorter length); None if identical."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    if len(reference) != len(other):
        return min(len(reference), len(other))
    return None


def greedy_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of the reference's positions where `other` has the same token (positions past the
    end of `other` count as disagreements). 1.0 for two empty lists."""
    if not reference:
        return 1.0 if not other else 0.0
    same = sum(a == b for a, b in zip(reference, other))
    return same / len(reference)


def top1_agreement(full_logits: torch.Tensor, method_logits: torch.Tensor) -> float:
    """Fraction of rows where both logits have the same argmax. full/method: (N, V)."""
    _check_pair(full_logits, method_logits)
    if full_logits.shape[0] == 0:
        return 1.0
    return (full_logits.argmax(-1) == method_logits.argmax(-1)).float().mean().item()


def kl_per_position(full_logits: torch.Tensor, method_logits: torch.Tensor) -> torch.Tensor:
    """KL(full || method) in nats per row: sum_v p_full(v) (log p_full(v) - log p_method(v)).
    full/method: (N, V) logits -> (N,) float64."""
    _check_pair(full_logits, method_logits)
    log_p = torch.log_softmax(full_logits.double(), dim=-1)
    log_q = torch.log_softmax(method_logits.double(), dim=-1)
    # xlogy-style: rows where p = 0 contribute 0 even if log q = -inf.
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def mean_kl(full_logits: torch.Tensor, method_logits: torch.Tensor) -> float:
    """Mean over positions of KL(full || method), nats. 0.0 for N = 0."""
    kl = kl_per_position(full_logits, method_logits)
    return kl.mean().item() if kl.numel() else 0.0


def nll(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target: logits (N, V), targets (N,) -> (N,) float64."""
    t = torch.as_tensor(targets, dtype=torch.long)
    if logits.dim() != 2 or t.dim() != 1 or logits.shape[0] != t.shape[0]:
        raise InputError(f"need logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(t.shape)}")
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -log_p.gather(1, t.unsqueeze(1)).squeeze(1)


def perplexity(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> float:
    """exp(mean NLL) of the targets under the logits. logits (N, V), targets (N,), N >= 1."""
    values = nll(logits, targets)
    if values.numel() == 0:
        raise InputError("perplexity needs at least one target token")
    return math.exp(values.mean().item())


def fidelity_report(full_logits: torch.Tensor, method_logits: torch.Tensor,
                    full_tokens: Sequence[int], method_tokens: Sequence[int]) -> dict[str, float | int | None]:
    """All fidelity numbers for one sample, JSON-able.

    full_logits / method_logits: (N, V) teacher-forced on full attention's greedy tokens;
    full_tokens / method_tokens: each method's own greedy output."""
    return {
        "greedy_agreement": greedy_agreement(full_tokens, method_tokens),
        "first_divergence": first_divergence(full_tokens, method_tokens),
        "top1_agreement": top1_agreement(full_logits, method_logits),
        "mean_kl": mean_kl(full_logits, method_logits),
        "n_positions": int(full_logits.shape[0]),
    }
