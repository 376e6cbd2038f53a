"""InfLLM (Xiao et al., NeurIPS 2024): sink + local window + retrieved memory blocks, drop-free.

At a decode step every budgeted layer attends to `budget` prompt tokens: the first `sink_tokens`
real tokens (InfLLM's "initial tokens"), the last `local` prompt tokens (its local window) and the
`blocks` memory blocks (contiguous runs of `block_size` prompt tokens between the two) most
relevant to the current query; plus every generated token. Nothing is evicted.

Relevance of a block = the current query's dot product with the block's representative key,
summed over the query heads (one choice shared by every head, as InfLLM's flattened
(heads x head_dim) vectors). The representative key is the mean of the keys of the block's
`repr_tokens` representative tokens: those with the highest representative score
r_m = sum_{j=1..repr_window} sum_heads q_{m+j} . k_m, the dot products of the `repr_window`
queries that follow token m with its key (the paper's formula, with the local window as the span).
The score of a row needs every prompt query after it, so a fork of a shared prefill hands the
layer the prefix's queries (`needs_prefix_queries`, as H2O).

Budget split (the same rule as every budgeted method: `budget` prompt tokens read per step):
sink = min(sink_tokens, budget); of the rest, `local_tokens` (default two thirds, InfLLM's
4096 local : 2048 retrieved) are the local window, the rest `blocks = rest // block_size` whole
blocks, and what does not fill a block joins the local window. Blocks tile the prompt backwards
from the start of the local window; the oldest block may be partial (it then reads fewer rows).

Deviations, documented in docs/methods.md: the prefill is full attention (the shared prefill of
every method; InfLLM encodes in chunks against its own sparse context), all KV stays on the device
(InfLLM offloads blocks to host memory with an LRU cache on the GPU), the local window does not
slide with generated tokens (they are all attended instead), and the defaults are scaled to short
contexts (paper: 128 sink, 4096 local, 16 blocks of 128, 4 representative tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from omnikv.algorithm.selection import gather_rows
from omnikv.budget import Budget
from omnikv.errors import ConfigError
from omnikv.hf.cache import ManagedCache, check_supported
from omnikv.hf.compat import sdpa_attention_forward, text_config
from omnikv.hf.layers import DenseLayer, make_sliding_layer
from omnikv.methods import register
from omnikv.methods.base import DEFAULT_BUDGET, Method, check_int
from omnikv.methods.memory import KVContext, KVPlan
from omnikv.methods.rows import first_real, subset_mask

NEG_INF = float("-inf")
LOCAL_SHARE = 2 / 3  # InfLLM's 4096 local of 4096 + 16 x 128 retrieved
SCORE_ELEMENTS = 1 << 24  # float32 elements of one chunk of representative-score logits


def split_budget(k: int, sink_tokens: int, local_tokens: int | None, block_size: int) -> tuple[int, int, int]:
    """(sink, local, blocks) with sink + local + blocks * block_size == k."""
    sink = min(sink_tokens, k)
    rest = k - sink
    local = min(rest, local_tokens if local_tokens is not None else math.ceil(rest * LOCAL_SHARE))
    blocks = (rest - local) // block_size
    return sink, rest - blocks * block_size, blocks


def representative_scores(query: torch.Tensor, keys: torch.Tensor, q_start: int, window: int) -> torch.Tensor:
    """Each key's score from the queries among the `window` positions after it.

    Args:
        query: (B, Hq, q, D) queries at positions q_start..q_start+q-1.
        keys: (B, Hk, n, D) keys at positions 0..n-1 (n >= q_start + q).
    Returns:
        (B, n) float32: sum over queries p with 1 <= p - m <= window and over query heads of q_p . k_m.
    """
    b, hq, q, d = query.shape
    hk, n = keys.shape[1], keys.shape[-2]
    out = torch.zeros(b, n, dtype=torch.float32, device=keys.device)
    step = max(1, SCORE_ELEMENTS // max(1, b * hq * (window + 1)))
    for s in range(0, q, step):
        e = min(q, s + step)
        lo, hi = max(0, q_start + s - window), q_start + e - 1  # keys some query of the chunk scores
        if hi <= lo:
            continue
        qc = query[:, :, s:e].float().view(b, hk, hq // hk, e - s, d)
        logits = torch.einsum("bhgqd,bhkd->bqk", qc, keys[:, :, lo:hi].float())  # summed over heads
        qpos = torch.arange(q_start + s, q_start + e, device=keys.device)[:, None]
        kpos = torch.arange(lo, hi, device=keys.device)[None, :]
        band = (qpos - kpos >= 1) & (qpos - kpos <= window)
        out[:, lo:hi] += logits.masked_fill(~band, 0.0).sum(dim=1)
    return out


class InfLLMLayer(DenseLayer):
    """All rows kept; a decode step reads sinks + the top blocks + the local window + generated."""

    supports_static = False  # the rows read change from step to step
    needs_prefix_queries = True  # representative scores need every prompt query

    def __init__(self, budget: Budget, sink_tokens: int, local_tokens: int | None, block_size: int,
                 repr_tokens: int, repr_window: int) -> None:
        super().__init__()
        self.budget = budget
        self.sink_tokens, self.local_tokens = sink_tokens, local_tokens
        self.block_size, self.repr_tokens, self.repr_window = block_size, repr_tokens, repr_window
        self.scores: torch.Tensor | None = None  # (B, seq) float32 representative score per position
        self.prompt_len = 0
        self.decoding = False
        self.memory: dict[str, Any] | None = None  # the blocks of the current decode run
        self.split = (0, 0, 0)  # sink, local, blocks of the current decode run
        self.selected_blocks: torch.Tensor | None = None  # (B, blocks) last step's block indices

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.seq_length == 0
        out = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1 or first:
            self.decoding, self.prompt_len, self.memory = False, self.seq_length, None
        else:
            self.decoding = True
        return out

    def observe_prefill(self, module, query: torch.Tensor, attention_mask, **kwargs) -> None:
        """Add the representative scores the queries (B, Hq, q, D) of this forward give."""
        keys = self.buffer.view()[0]
        n = keys.shape[-2]
        have = 0 if self.scores is None else self.scores.shape[-1]
        grown = torch.zeros(keys.shape[0], n, dtype=torch.float32, device=keys.device)
        if have:
            grown[:, :have].copy_(self.scores)
        self.scores = grown + representative_scores(query, keys, n - query.shape[2], self.repr_window)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        if not self.decoding:
            self.observe_prefill(module, query, attention_mask, **kwargs)
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        t = self.prompt_len
        if self.memory is None:
            valid = None if attention_mask is None else attention_mask[:, 0, -1, :t]
            self.memory = self.build_memory(key[:, :, :t], valid)
        positions, keep = self.rows(query)
        k_sel, v_sel = gather_rows(key, positions), gather_rows(value, positions)
        hq = query.shape[1]
        mask = subset_mask(attention_mask, positions, self.seq_length - 1, 1, hq)  # (B, Hq, 1, n)
        mask = mask & keep[:, None, None, :]
        sink, local, blocks = self.split
        self.last_attended = min(t, sink + local + blocks * self.block_size) + (self.seq_length - t)
        return sdpa_attention_forward(module, query, k_sel, v_sel, mask, **kwargs)

    def build_memory(self, keys: torch.Tensor, valid: torch.Tensor | None) -> dict[str, Any]:
        """The blocks of the prompt (B, Hk, t, D) between the sinks and the local window, with
        their representative keys. valid: (B, t) bool (False = padding) or None."""
        b, hk, t, d = keys.shape
        k = self.budget.tokens(t, clip=False)
        start = first_real(valid, b, keys.device)  # (B, 1)
        sink, local, blocks = split_budget(min(k, t), self.sink_tokens, self.local_tokens, self.block_size)
        if k >= t:
            sink, local, blocks = 0, t, 0  # a budget covering the prompt reads all of it
        self.split = (sink, local, blocks)
        end = t - local  # the local window starts here
        count = max(0, math.ceil((end - int(start.min()) - sink) / self.block_size))
        offs = torch.arange(self.block_size, device=keys.device)
        firsts = end - (torch.arange(count, device=keys.device) + 1) * self.block_size  # block j, newest first
        pos = firsts[:, None] + offs[None, :]  # (P, S)
        ok = pos[None] >= start[:, :, None] + sink  # (B, P, S): rows of the block after the sinks
        score = self.scores[:, :t].gather(-1, pos.clamp(min=0).view(1, -1).expand(b, -1)).view(b, count, self.block_size)
        r = min(self.repr_tokens, self.block_size)
        top = score.masked_fill(~ok, NEG_INF).topk(r, dim=-1)  # (B, P, r)
        chosen = pos.clamp(min=0)[None].expand(b, -1, -1).gather(-1, top.indices)  # (B, P, r) positions
        weight = top.values.isfinite().float()  # a partial block has fewer representatives
        rk = gather_rows(keys, chosen.view(b, 1, -1)).float().view(b, hk, count, r, d)
        rep = (rk * weight[:, None, :, :, None]).sum(dim=3) / weight.sum(-1).clamp(min=1)[:, None, :, None]
        return {"start": start, "pos": pos, "ok": ok, "block_ok": ok.any(dim=-1), "rep": rep}

    def rows(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, Hk, n), keep (B, n)) of this step: sinks, top blocks, local, generated."""
        mem, t = self.memory, self.prompt_len
        sink, local, blocks = self.split
        b, hq, _, d = query.shape
        rep = mem["rep"]  # (B, Hk, P, D)
        hk, count = rep.shape[1], rep.shape[2]
        dev = query.device
        q = query.float().view(b, hk, hq // hk, d).sum(dim=2)  # (B, Hk, D): the heads' sum of q . rep
        score = torch.einsum("bhd,bhpd->bp", q, rep).masked_fill(~mem["block_ok"], NEG_INF)
        take = min(blocks, count)
        top = score.topk(take, dim=-1)
        self.selected_blocks = top.indices
        sinks = mem["start"] + torch.arange(sink, device=dev)  # (B, sink)
        block_pos = mem["pos"][top.indices].view(b, -1)  # (B, take * S)
        block_ok = mem["ok"].gather(1, top.indices[..., None].expand(-1, -1, self.block_size)).view(b, -1)
        block_ok &= top.values.isfinite().repeat_interleave(self.block_size, dim=-1)
        tail = torch.arange(t - local, self.seq_length, device=dev).expand(b, -1)  # local + generated
        positions = torch.cat([sinks.clamp(max=t - 1), block_pos.clamp(min=0), tail], dim=-1)
        keep = torch.cat([sinks < t - local, block_ok, torch.ones_like(tail, dtype=torch.bool)], dim=-1)
        return positions[:, None].expand(b, hk, -1), keep

    def _memory_bytes(self) -> int:
        return 0 if self.memory is None else self.memory["rep"].numel() * self.memory["rep"].element_size()

    def device_bytes(self) -> int:
        return super().device_bytes() + self._memory_bytes()

    def allocated_device_bytes(self) -> int:
        return super().allocated_device_bytes() + self._memory_bytes()


class InfLLMCache(ManagedCache):
    method_name = "infllm"

    def __init__(self, model: torch.nn.Module, method: InfLLM) -> None:
        types = check_supported(model, "infllm")
        cfg = text_config(model)
        layers = [
            make_sliding_layer(cfg) if kind == "sliding_attention" else InfLLMLayer(
                method.budget_rule, method.sink_tokens, method.local_tokens, method.block_size,
                method.repr_tokens, method.repr_window)
            for kind in types
        ]
        self.budget = method.budget
        super().__init__(model, layers)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        inf = [l for l in self.layers if isinstance(l, InfLLMLayer)]
        s["prompt_tokens"] = max((l.prompt_len for l in inf), default=0)
        s["budget"] = self.budget
        sink, local, blocks = inf[0].split if inf else (0, 0, 0)
        s.update(sink_tokens=sink, local_tokens=local, blocks_per_step=blocks)
        return s


@register("infllm")
@dataclass(eq=False)
class InfLLM(Method):
    """Options: `sink_tokens` (4), `local_tokens` (None: two thirds of the budget after the sinks),
    `block_size` (16), `repr_tokens` (4), `repr_window` (64: queries after a token that score it)."""

    sink_tokens: int = 4
    local_tokens: int | None = None
    block_size: int = 16
    repr_tokens: int = 4
    repr_window: int = 64
    default_budget = DEFAULT_BUDGET
    needs_real_prefill = True  # representative tokens are scored from the prefill's queries

    def validate(self) -> None:
        check_int("sink_tokens", self.sink_tokens, 0)
        if self.local_tokens is not None:
            check_int("local_tokens", self.local_tokens, 0)
        check_int("block_size", self.block_size, 1)
        check_int("repr_tokens", self.repr_tokens, 1)
        check_int("repr_window", self.repr_window, 1)
        fixed = self.sink_tokens + (self.local_tokens or 0)
        if isinstance(self.budget, int) and fixed > self.budget:
            raise ConfigError(
                f"infllm: sink_tokens + local_tokens = {fixed} exceeds budget={self.budget}; raise the budget or "
                "lower them"
            )

    def make_cache(self, model) -> InfLLMCache:
        return InfLLMCache(model, self)

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        """Drop-free: every row stays on the device, plus one representative key per block on each
        full-attention layer."""
        key_row = ctx.row_bytes // 2
        reps = sum(key_row * math.ceil(ctx.context / self.block_size)
                   for kind in ctx.layer_types if kind != "sliding_attention")
        return KVPlan(ctx.full_kv_bytes + reps, 0, ["drop-free on the device: all KV + one representative key per block"])

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": False,
            "sink_tokens": self.sink_tokens,
            "local_tokens": self.local_tokens if self.local_tokens is not None else "2/3 of budget - sink",
            "block_size": self.block_size,
            "repr_tokens": self.repr_tokens,
            "repr_window": self.repr_window,
            "budgeted_layers": "every full-attention layer",
            "attended": "sink + top blocks + local window = budget prompt tokens + every generated token",
            "device_kv": "every row (drop-free, no offload) + one representative key per block",
        }
