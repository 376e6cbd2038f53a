"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks + a sliding window of recent tokens.

Each full-attention layer keeps `sink_tokens` first tokens and the most recent
`budget - sink_tokens` tokens: exactly `budget` rows between forwards, so a decode step attends to
those `budget` rows plus the new token itself. Everything else is evicted for good (lossy). The
prefill itself is full attention (the window starts to slide at the first decode step).

Rows keep their original (post-RoPE) positions; the paper re-assigns positions inside the cache,
which a cache of rotated keys cannot do (see docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from omnikv.errors import ConfigError
from omnikv.budget import Budget
from omnikv.methods import register
from omnikv.methods.lossy import LossyCache, LossyLayer, LossyMethod
from omnikv.methods.base import check_int
from omnikv.methods.rows import first_real
from omnikv.algorithm.selection import select_topk

NEG_INF = float("-inf")


class StreamingLayer(LossyLayer):
    """Sinks + recent window; the same rows for every KV head (G = 1)."""

    per_head = False

    def __init__(self, budget: Budget, sink_tokens: int) -> None:
        super().__init__(budget)
        self.sink_tokens = sink_tokens
        self.pad: torch.Tensor | None = None  # (B, 1) left-padding length per sequence

    def _sink(self) -> int:
        return min(self.sink_tokens, max(self.kept_budget - 1, 0))

    def compact(self, valid, module, **kwargs) -> None:
        keys, _, pos = self.store.view()
        b = keys.shape[0]
        self.pad = first_real(valid, b, keys.device)
        n_old = self.store.n - 1  # rows before the new token
        k = self.kept_budget
        if n_old <= k:
            return
        prompt_pos = pos[:, :, :n_old]  # (B, 1, n_old)
        # Score = position (newest best); sinks forced; padding last. select_topk's forcing works on
        # row indices, so sinks/window are expressed through the scores directly.
        scores = prompt_pos.float()
        real_start = self.pad.unsqueeze(-1)  # (B, 1, 1)
        is_sink = (prompt_pos >= real_start) & (prompt_pos < real_start + self._sink())
        scores = scores.masked_fill(is_sink, float("inf"))
        scores = scores.masked_fill(prompt_pos < real_start, NEG_INF)
        chosen = select_topk(scores, k)
        self.keep_with_new_token(chosen)

    def after_decode(self, module, query, valid, **kwargs) -> None:
        if self.store.live <= self.kept_budget:
            return
        _, _, pos = self.store.view()  # (B, 1, n)
        real_start = self.pad.unsqueeze(-1)
        is_sink = (pos >= real_start) & (pos < real_start + self._sink())
        # Evict the oldest non-sink row (left padding is older than every real token: it goes first).
        age_rank = pos.masked_fill(is_sink, torch.iinfo(torch.long).max)
        self.store.free = age_rank.argmin(dim=-1)  # (B, 1)
        self.evicted += 1


@register("streaming_llm")
@dataclass(eq=False)
class StreamingLLM(LossyMethod):
    """Options: `sink_tokens` (default 4). Window = budget - sink_tokens."""

    sink_tokens: int = 4

    def validate(self) -> None:
        check_int("sink_tokens", self.sink_tokens, 0)
        if isinstance(self.budget, int) and self.budget <= self.sink_tokens:
            raise ConfigError(
                f"streaming_llm budget={self.budget} leaves no recent window after {self.sink_tokens} "
                "sink tokens; raise the budget or lower sink_tokens"
            )

    def make_cache(self, model) -> LossyCache:
        return LossyCache(model, self.name, lambda: StreamingLayer(self.budget_rule, self.sink_tokens), self.budget)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": True,
            "sink_tokens": self.sink_tokens,
            "budgeted_layers": "every full-attention layer",
            "kept_rows": "sink_tokens + window = budget per layer (prompt and generated tokens)",
            "device_kv": "budget rows per full-attention layer after the first decode step",
        }
