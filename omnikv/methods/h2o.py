"""H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): keep the tokens that received the most
attention so far ("heavy hitters") plus a window of recent tokens; evict one row per decode step.

Per KV head, each kept row carries its accumulated attention: the sum of the softmax weights every
query gave it (all prompt queries during the prefill, then each decode query), summed over the
query heads that share the KV head (GQA). At the first decode step each layer keeps `budget` rows
per KV head: the `recent_tokens` newest, the first `sink_tokens` real tokens (0 by default, as the
paper; they are heavy hitters that can never be evicted) and the highest-scoring rest. After every
decode step's attention the lowest-scoring row outside the sinks and the recent window is evicted,
so each layer holds exactly `budget` rows per KV head between steps (the step attends `budget` rows
plus the new token itself).

Costs: the prefill computes the attention weights once more, in query chunks (O(T^2) time, O(chunk
* T) memory), because SDPA does not return them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from omnikv.hf.attention import attention_probs, scaling_of
from omnikv.hf.buffers import grown_capacity
from omnikv.errors import ConfigError
from omnikv.budget import Budget
from omnikv.methods import register
from omnikv.methods.lossy import HEADROOM, LossyCache, LossyLayer, LossyMethod
from omnikv.methods.base import check_int
from omnikv.methods.rows import first_real, subset_mask
from omnikv.algorithm.selection import select_topk

NEG_INF = float("-inf")
POS_INF = float("inf")
PREFILL_SCORE_ELEMENTS = 1 << 25  # float32 elements of one chunk of prefill weights (128 MiB)


class H2OLayer(LossyLayer):
    per_head = True
    needs_prefix_queries = True  # every prompt query votes (`observe_prefill`)

    def __init__(self, budget: Budget, recent_tokens: int | None, sink_tokens: int) -> None:
        super().__init__(budget)
        self.recent_tokens = recent_tokens
        self.sink_tokens = sink_tokens
        self._acc: torch.Tensor | None = None  # (B, Hk, capacity) float32 accumulated attention per slot
        self.acc: torch.Tensor | None = None  # (B, Hk, n) view of the slots in use
        self.pad: torch.Tensor | None = None  # (B, 1) left-padding length

    # -- split of the budget --------------------------------------------------------------------
    def recent(self) -> int:
        k = self.kept_budget
        r = k // 2 if self.recent_tokens is None else self.recent_tokens
        return max(0, min(r, k - self.sinks()))

    def sinks(self) -> int:
        return min(self.sink_tokens, self.kept_budget)

    def protected(self, pos: torch.Tensor, newest: int) -> torch.Tensor:
        """(B, Hk, n) bool: rows never evicted (sinks and the recent window ending at `newest`)."""
        start = self.pad.unsqueeze(-1)
        sink = (pos >= start) & (pos < start + self.sinks())
        return sink | (pos > newest - self.recent())

    # -- scores ---------------------------------------------------------------------------------
    def _acc_for(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """acc with one entry per slot in use (new slots start at 0); the buffer behind it grows
        by the one rule of growable buffers (buffers.grown_capacity), not by one slot a step."""
        b, h = like.shape[:2]
        have = 0 if self._acc is None else self._acc.shape[-1]
        if n > have:
            grown = torch.zeros((b, h, grown_capacity(n, have, HEADROOM)), dtype=torch.float32, device=like.device)
            if self.acc is not None:
                grown[..., : self.acc.shape[-1]].copy_(self.acc)
            self._acc = grown
        if self.acc is None or self.acc.shape[-1] != n:
            self.acc = self._acc[..., :n]
        return self.acc

    def on_rebuild(self, slots: torch.Tensor) -> None:
        self._acc = self.acc.gather(-1, slots)
        self.acc = self._acc

    def observe_prefill(self, module, query, attention_mask, **kwargs) -> None:
        keys, _, pos = self.store.view()
        n, q = keys.shape[-2], query.shape[2]
        acc = self._acc_for(n, keys)
        scaling = scaling_of(module, query, kwargs)
        step = max(1, PREFILL_SCORE_ELEMENTS // max(1, query.shape[0] * query.shape[1] * n))
        q_start = self.seq_length - q
        for s in range(0, q, step):
            e = min(q, s + step)
            m = None if attention_mask is None else attention_mask[:, :, s:e]
            mask = subset_mask(m, pos, q_start + s, e - s, pos.shape[1])  # (B, Hk, c, n): no repeat
            probs = attention_probs(query[:, :, s:e], keys, mask, scaling)  # (B, Hk, g, c, n)
            acc[..., :n] += probs.sum(dim=(2, 3))

    def compact(self, valid, module, **kwargs) -> None:
        keys, _, pos = self.store.view()
        self.pad = first_real(valid, keys.shape[0], keys.device)
        self._acc_for(self.store.n, keys)
        n_old = self.store.n - 1  # the new token is the last slot
        k = self.kept_budget
        if n_old <= k:
            return
        prompt_pos = pos[..., :n_old]
        scores = self.acc[..., :n_old].masked_fill(self.protected(prompt_pos, self.prompt_len - 1), POS_INF)
        scores = scores.masked_fill(prompt_pos < self.pad.unsqueeze(-1), NEG_INF)
        self.keep_with_new_token(select_topk(scores, k))

    def after_decode(self, module, query, valid, **kwargs) -> None:
        keys, _, pos = self.store.view()
        acc = self._acc_for(self.store.n, keys)
        mask = None
        if valid is not None:
            mask = valid.gather(-1, pos.flatten(1)).view_as(pos).unsqueeze(2)  # (B, Hk, 1, n)
            mask = mask.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        probs = attention_probs(query, keys, mask, scaling_of(module, query, kwargs))
        acc += probs.sum(dim=(2, 3))
        if self.store.live <= self.kept_budget:
            return
        scores = acc.masked_fill(self.protected(pos, self.seq_length - 1), POS_INF)
        scores = scores.masked_fill(pos < self.pad.unsqueeze(-1), NEG_INF)  # padding goes first
        self.store.free = scores.argmin(dim=-1)  # (B, Hk)
        self.evicted += 1


@register("h2o")
@dataclass(eq=False)
class H2O(LossyMethod):
    """Options: `recent_tokens` (default: half the budget, as the paper's equal heavy/recent split),
    `sink_tokens` (default 0: first real tokens never evicted). heavy + recent = budget."""

    recent_tokens: int | None = None
    sink_tokens: int = 0
    needs_real_prefill = True  # the heavy hitters are scored from the prefill's attention

    def validate(self) -> None:
        if self.recent_tokens is not None:
            check_int("recent_tokens", self.recent_tokens, 0)
        check_int("sink_tokens", self.sink_tokens, 0)
        if isinstance(self.budget, int) and (self.recent_tokens or 0) + self.sink_tokens > self.budget:
            raise ConfigError(
                f"h2o: recent_tokens + sink_tokens = {(self.recent_tokens or 0) + self.sink_tokens} exceeds "
                f"budget={self.budget}; raise the budget or lower them"
            )

    def make_cache(self, model) -> LossyCache:
        return LossyCache(
            model, self.name, lambda: H2OLayer(self.budget_rule, self.recent_tokens, self.sink_tokens), self.budget
        )

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": True,
            "recent_tokens": self.recent_tokens if self.recent_tokens is not None else "budget // 2",
            "sink_tokens": self.sink_tokens,
            "budgeted_layers": "every full-attention layer",
            "kept_rows": "heavy + recent = budget per KV head (prompt and generated tokens)",
            "device_kv": "budget rows per KV head per full-attention layer after the first decode step",
        }
