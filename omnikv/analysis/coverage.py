"""Inter-layer attention coverage and the statistics derived from it.

coverage[i, j] = share of layer j's softmax attention mass (mean over its query heads) that falls on
the key set a sparse layer would attend if layer i were its filter layer: layer i's top-k prompt
tokens (sink / recent prompt tokens, when counted, are forced into those k, as the library does) +
every generated token. The diagonal is the
"oracle": a layer's own top-k. Averaged over decode steps.

Inputs (see `capture.AttentionRecord`):
  scores: (S, L, H, P) selection scores over prompt keys (raw scaled logits for selector "last")
  probs:  (S, L, H, T) softmax attention probabilities over all keys, T >= P
A 3-dim input (L, H, .) is taken as one decode step.
"""

from __future__ import annotations

import torch

from omnikv.analysis.selection_sets import topk_indices
from omnikv.budget import Budget
from omnikv.errors import InputError


def attention_from_qk(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, prompt_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection scores and attention probabilities from post-RoPE queries and keys.

    queries: (S, L, H, D) one decode query per step and layer; keys: (S, L, H_kv, T, D) the keys
    each query attends (all of them: no mask). Returns scores (S, L, H, P) = q.k * scaling over the first
    `prompt_len` keys, and probs (S, L, H, T) = softmax over all keys. GQA: KV head h serves query
    heads h*g .. h*g+g-1.
    """
    if queries.dim() != 4 or keys.dim() != 5 or queries.shape[:2] != keys.shape[:2]:
        raise InputError("queries must be (S, L, H, D) and keys (S, L, H_kv, T, D) with the same S, L")
    heads, kv = queries.shape[2], keys.shape[2]
    if heads % kv or queries.shape[-1] != keys.shape[-1] or not 0 < prompt_len <= keys.shape[3]:
        raise InputError(f"{heads} query heads / {kv} KV heads, head dims or prompt_len={prompt_len} do not fit")
    expanded = keys.float().repeat_interleave(heads // kv, dim=2)  # (S, L, H, T, D)
    logits = torch.einsum("slhd,slhtd->slht", queries.float(), expanded) * scaling
    return logits[..., :prompt_len], torch.softmax(logits, dim=-1)


def _check(scores: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dim() == 3:
        scores = scores.unsqueeze(0)
    if probs.dim() == 3:
        probs = probs.unsqueeze(0)
    if scores.dim() != 4 or probs.dim() != 4:
        raise InputError("scores must be (S, L, H, P) and probs (S, L, H, T)")
    if scores.shape[:3] != probs.shape[:3]:
        raise InputError(f"scores {tuple(scores.shape)} and probs {tuple(probs.shape)} disagree on S, L, H")
    if probs.shape[-1] < scores.shape[-1]:
        raise InputError("probs must cover at least the prompt positions scores cover (T >= P)")
    return scores, probs


def coverage_matrices(
    scores: torch.Tensor,
    probs: torch.Tensor,
    ks: list[int | float],
    head_reduce: str = "max",
    num_kv_heads: int | None = None,
    sink: int = 0,
    recent: int = 0,
) -> list[torch.Tensor]:
    """`coverage_matrix` for several budgets at once (one top-k shared by all of them)."""
    scores, probs = _check(scores, probs)
    steps, layers, heads, total = probs.shape
    prompt_len = scores.shape[-1]
    kv = heads if num_kv_heads is None else num_kv_heads
    sizes = [Budget(k).selected(prompt_len, sink=sink, recent=recent) for k in ks]
    # Sorted top-k: the top-k' for k' < k is a prefix (forced sink/recent come first, at +inf).
    idx = topk_indices(scores, max(sizes), head_reduce, kv, sink, recent)  # (S, L, R, kmax)
    sets = idx.shape[-2]
    # Sum each index set's query heads' probabilities once, instead of expanding masks to heads.
    grouped = probs.reshape(steps, layers, sets, heads // sets, total).sum(3)  # (S, L, R, T)
    generated = grouped[..., prompt_len:].sum(dim=(-1, -2))  # (S, L): always kept
    r = torch.arange(sets).view(1, sets, 1)
    out = [torch.zeros(layers, layers, dtype=torch.float64) for _ in ks]
    for s in range(steps):
        # picked[j, i, r, n] = probability mass layer j's group r puts on layer i's n-th pick
        picked = grouped[s, :, :, :prompt_len][:, r, idx[s]]  # (L_j, L_i, R, kmax)
        cum = picked.double().cumsum(-1).sum(2)  # (L_j, L_i, kmax): mass on the first n picks
        for m, size in zip(out, sizes):
            m += (cum[..., size - 1] + generated[s].double()[:, None]).T
    return [m / (steps * heads) for m in out]


def coverage_matrix(
    scores: torch.Tensor,
    probs: torch.Tensor,
    k: int | float,
    head_reduce: str = "max",
    num_kv_heads: int | None = None,
    sink: int = 0,
    recent: int = 0,
) -> torch.Tensor:
    """coverage[i, j]: mass of layer j on layer i's kept set, mean over heads and steps. -> (L, L) float64."""
    return coverage_matrices(scores, probs, [k], head_reduce, num_kv_heads, sink, recent)[0]


def coverage_decay(coverage: torch.Tensor) -> list[float]:
    """Mean coverage of layer i + d by layer i, for d = 0 .. L-1 (d = 0 is the own-top-k oracle)."""
    layers = coverage.shape[0]
    return [float(torch.diagonal(coverage, offset=d).mean()) for d in range(layers)]


def topk_jaccard(
    scores: torch.Tensor, k: int | float, head_reduce: str = "max", num_kv_heads: int | None = None
) -> torch.Tensor:
    """Stability of each layer's top-k across consecutive decode steps.

    scores: (S, L, H, P), S >= 2 -> (L,) mean Jaccard |A_t & A_t+1| / |A_t | A_t+1| (per_kv_head:
    also averaged over KV heads).
    """
    if scores.dim() != 4 or scores.shape[0] < 2:
        raise InputError("Jaccard stability needs scores (S, L, H, P) with at least 2 decode steps")
    heads, prompt_len = scores.shape[-2], scores.shape[-1]
    kv = heads if num_kv_heads is None else num_kv_heads
    idx = topk_indices(scores, Budget(k).selected(prompt_len), head_reduce, kv)  # (S, L, R, k)
    sets = torch.zeros(*idx.shape[:-1], prompt_len, dtype=torch.bool).scatter_(-1, idx, True)
    inter = (sets[1:] & sets[:-1]).sum(-1).double()
    union = (sets[1:] | sets[:-1]).sum(-1).double()
    return (inter / union).mean(dim=(0, 2))


def mass_distribution(probs: torch.Tensor, prompt_len: int, sink: int, recent: int) -> dict[str, torch.Tensor]:
    """Where each layer puts its attention: sink / middle / recent prompt tokens and generated tokens.

    probs: (S, L, H, T) -> dict of (L,) tensors (mean over steps and heads); they sum to 1 per layer.
    Sink and recent are clipped so that they do not overlap.
    """
    if probs.dim() == 3:
        probs = probs.unsqueeze(0)
    sink_end = min(sink, prompt_len)
    recent_start = max(sink_end, prompt_len - recent)
    per_layer = lambda a, b: probs[..., a:b].sum(-1).double().mean(dim=(0, 2))  # noqa: E731
    return {
        "sink": per_layer(0, sink_end),
        "middle": per_layer(sink_end, recent_start),
        "recent": per_layer(recent_start, prompt_len),
        "generated": per_layer(prompt_len, probs.shape[-1]),
    }
