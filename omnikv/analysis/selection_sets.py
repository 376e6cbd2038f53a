"""Which keys a sparse layer would attend, given another layer's selection scores.

Pure tensor functions, no transformers import. They restate the library's selector
(`omnikv.algorithm.selection`) for analysis: head reduction, top-k over *prompt* positions with the sink /
recent prompt tokens forced in (they count inside the budget k, as in `OmniKVConfig`), plus every
generated token, which a sparse layer always attends.

Shapes: S decode steps, L layers, H query heads, H_kv KV heads (GQA group g = H // H_kv),
P prompt tokens, T >= P key positions (prompt first, then generated tokens; padded slots of
not-yet-generated tokens carry zero probability, so counting them as "kept" changes nothing).
"""

from __future__ import annotations

import math

import torch

from omnikv.config import HEAD_REDUCTIONS
from omnikv.errors import ConfigError, InputError


def reduce_heads(scores: torch.Tensor, head_reduce: str, num_kv_heads: int) -> torch.Tensor:
    """Aggregate per-query-head selection scores into one score row per index set.

    scores: (..., H, P) -> (..., 1, P) for "max"/"sum", (..., H_kv, P) for "per_kv_head"
    (max over the query heads of each KV group: query heads h*g .. h*g+g-1 share KV head h).
    """
    if head_reduce not in HEAD_REDUCTIONS:
        raise ConfigError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    num_heads = scores.shape[-2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise InputError(f"{num_heads} query heads cannot be split into {num_kv_heads} KV heads")
    if head_reduce == "max":
        return scores.amax(dim=-2, keepdim=True)
    if head_reduce == "sum":
        return scores.sum(dim=-2, keepdim=True)
    group = num_heads // num_kv_heads
    grouped = scores.reshape(*scores.shape[:-2], num_kv_heads, group, scores.shape[-1])
    return grouped.amax(dim=-2)


def topk_indices(
    scores: torch.Tensor, k: int, head_reduce: str, num_kv_heads: int, sink: int = 0, recent: int = 0
) -> torch.Tensor:
    """Top-k prompt positions per index set, the first `sink` and last `recent` forced in.

    scores: (..., H, P) -> (..., R, k), R = 1 or H_kv, best first (forced tokens first).
    """
    if sink < 0 or recent < 0:
        raise ConfigError(f"sink and recent must be >= 0, got {sink}, {recent}")
    reduced = reduce_heads(scores, head_reduce, num_kv_heads)
    prompt_len = reduced.shape[-1]
    if sink or recent:
        reduced = reduced.clone()
        reduced[..., : min(sink, prompt_len)] = math.inf
        if recent:
            reduced[..., max(0, prompt_len - recent) :] = math.inf
    return reduced.topk(min(k, prompt_len), dim=-1, sorted=True).indices
