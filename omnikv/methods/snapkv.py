"""SnapKV (Li et al., NeurIPS 2024): the last prompt queries ("observation window") vote for the
prompt tokens worth keeping; each KV head keeps its own set, chosen once per prompt.

At the first decode step after a prompt, every full-attention layer, per KV head:
1. takes the softmax attention of the last `window_size` prompt queries over the prompt (causal
   inside the window), sums it over those queries -> one vote per prompt token and query head;
2. reduces the votes of the query heads sharing the KV head (GQA) with `head_reduce` (`mean`,
   default, or `max`);
3. smooths them along the sequence with a 1-D pooling (`pooling` `max` or `avg`, `kernel_size` 7,
   stride 1, same padding: the paper's clustering step, so neighbours of a hit come along);
4. keeps the top `budget - window` prompt tokens by that score, plus the window itself, and drops
   the rest for good (lossy). Kept per KV head = budget, window included.
Generated tokens are all kept (SnapKV compresses the prompt only). A later prompt extension (a new
chat turn) is compressed again, with the window taken from the new turn's queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from omnikv.hf.attention import attention_probs, scaling_of
from omnikv.errors import ConfigError
from omnikv.budget import Budget
from omnikv.methods import register
from omnikv.methods.lossy import LossyCache, LossyLayer, LossyMethod
from omnikv.methods.base import check_int
from omnikv.methods.memory import KVContext
from omnikv.algorithm.selection import select_topk

POOLINGS = ("max", "avg")
HEAD_REDUCES = ("mean", "max")
NEG_INF = float("-inf")


def snap_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    head_reduce: str,
    pooling: str,
    kernel_size: int,
) -> torch.Tensor:
    """SnapKV's score of each stored prompt row, per KV head.

    Args:
        window_queries: (B, Hq, w, D) the observation window's queries, oldest first.
        keys: (B, Hk, n, D) prompt rows (the window's own rows are the last w).
        key_pos: (B, Hk, n) logical position of each row; query_pos: (w,) of each window query.
        valid: (B, N) bool over logical positions (False = padding) or None.
    Returns:
        (B, Hk, n - w) float32 scores of the rows before the window; padding rows -inf.
    """
    b, hq, w, _ = window_queries.shape
    hk, n = keys.shape[1], keys.shape[-2]
    mask = key_pos[:, :, None, :] <= query_pos[None, None, :, None]  # (B, Hk, w, n) causal
    if valid is not None:
        row_ok = valid.gather(-1, key_pos.flatten(1)).view_as(key_pos)
        mask = mask & row_ok[:, :, None, :] & valid[:, query_pos][:, None, :, None]
    mask = mask.repeat_interleave(hq // hk, dim=1)
    probs = attention_probs(window_queries, keys, mask, scaling)  # (B, Hk, g, w, n)
    votes = probs[..., : n - w].sum(dim=3)  # (B, Hk, g, n - w)
    votes = votes.mean(dim=2) if head_reduce == "mean" else votes.amax(dim=2)
    if kernel_size > 1 and votes.shape[-1] > 0:
        flat = votes.reshape(b * hk, 1, -1)
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        # avg: zero padding counts in the mean at the edges, as in SnapKV's repository and kvpress
        # (F.avg_pool1d's default); tests/test_kvpress.py holds pooling="avg" to kvpress's SnapKVPress.
        kwargs = {} if pooling == "max" else {"count_include_pad": True}
        votes = pool(flat, kernel_size, stride=1, padding=kernel_size // 2, **kwargs).view(b, hk, -1)
    if valid is not None:  # pooling spreads scores onto padding neighbours: mask again
        votes = votes.masked_fill(~row_ok[..., : n - w], NEG_INF)
    return votes


class SnapKVLayer(LossyLayer):
    per_head = True

    def __init__(
        self, budget: Budget, window_size: int, kernel_size: int, pooling: str, head_reduce: str
    ) -> None:
        super().__init__(budget)
        self.window_size = window_size
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.head_reduce = head_reduce
        self.window: torch.Tensor | None = None  # (B, Hq, <=W, D) newest prompt queries

    def prefill_window(self) -> int:
        return self.window_size

    def update(self, key_states, value_states, *args, **kwargs):
        if self.decoding and key_states.shape[-2] > 1:
            self.window = None  # a new turn: its own queries form the window
        return super().update(key_states, value_states, *args, **kwargs)

    def observe_prefill(self, module, query, attention_mask, **kwargs) -> None:
        w = query if self.window is None else torch.cat([self.window, query], dim=2)
        self.window = w[:, :, -self.window_size :].detach()

    def compact(self, valid, module, **kwargs) -> None:
        window, self.window = self.window, None
        keys, _, pos = self.store.view()
        n_old = self.store.n - 1  # the new token is the last slot
        k = self.kept_budget
        if n_old <= k or window is None:
            return
        w = min(window.shape[2], k, n_old)
        window = window[:, :, window.shape[2] - w :]
        query_pos = torch.arange(self.prompt_len - w, self.prompt_len, device=keys.device)
        scores = snap_scores(
            window, keys[:, :, :n_old], pos[..., :n_old], query_pos, valid, scaling_of(module, window, kwargs),
            self.head_reduce, self.pooling, self.kernel_size,
        )
        b, hk = scores.shape[:2]
        chosen = select_topk(scores, k - w) if k > w else scores.new_empty((b, hk, 0), dtype=torch.long)
        tail = torch.arange(n_old - w, n_old, device=keys.device).expand(b, hk, w)
        self.keep_with_new_token(torch.cat([chosen, tail], dim=-1))


@register("snapkv")
@dataclass(eq=False)
class SnapKV(LossyMethod):
    """Options: `window_size` (32), `kernel_size` (7), `pooling` ("max" | "avg"),
    `head_reduce` ("mean" | "max" over the query heads of a KV head)."""

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    head_reduce: str = "mean"
    needs_real_prefill = True  # the observation window's queries vote during the prefill

    def validate(self) -> None:
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"snapkv kernel_size must be odd (same-length pooling); got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"snapkv pooling {self.pooling!r} is unknown; choose one of {POOLINGS}")
        if self.head_reduce not in HEAD_REDUCES:
            raise ConfigError(f"snapkv head_reduce {self.head_reduce!r} is unknown; choose one of {HEAD_REDUCES}")

    def kept_tokens(self, ctx: KVContext) -> int:
        """SnapKV compresses the prompt only: every generated token is kept too."""
        return super().kept_tokens(ctx) + ctx.max_new_tokens

    def make_cache(self, model) -> LossyCache:
        def layer() -> SnapKVLayer:
            return SnapKVLayer(self.budget_rule, self.window_size, self.kernel_size, self.pooling, self.head_reduce)

        return LossyCache(model, self.name, layer, self.budget)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": True,
            "window_size": self.window_size,
            "kernel_size": self.kernel_size,
            "pooling": self.pooling,
            "head_reduce": self.head_reduce,
            "budgeted_layers": "every full-attention layer",
            "kept_rows": "budget prompt rows per KV head (window included) + every generated token",
            "device_kv": "budget + generated rows per KV head per full-attention layer after the first decode step",
        }
