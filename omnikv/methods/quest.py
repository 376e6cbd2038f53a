"""Quest (Tang et al., ICML 2024): query-aware page selection, drop-free, no offload.

The prompt of each budgeted layer is cut into pages of `page_size` (16) tokens; each page keeps the
element-wise min and max of its keys. At every decode step the current query bounds each page's
best attention logit by sum_d max(q_d * min_d, q_d * max_d), and the layer attends to the
ceil(budget / page_size) pages with the highest bound, plus every token generated in the current
decode run. Nothing is evicted (all KV stays on the device): only what each step reads is sparse.
The first `dense_layers` (2) layers of the model attend densely, as in the paper.

Deviations, documented in docs/methods.md: with GQA a KV head serves several query heads; a page's
bound for a KV head is the max over those query heads (Quest is per query head on MHA models).
Generated tokens are always attended instead of competing for the page budget, so `budget` is
exactly the prompt tokens read per step, as for the other methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from omnikv.budget import Budget
from omnikv.hf.cache import ManagedCache, check_supported
from omnikv.hf.compat import sdpa_attention_forward, text_config
from omnikv.hf.layers import DenseLayer, make_sliding_layer
from omnikv.methods import register
from omnikv.methods.base import DEFAULT_BUDGET, Method, check_int
from omnikv.methods.memory import KVContext, KVPlan
from omnikv.methods.rows import first_real, subset_mask
from omnikv.algorithm.selection import gather_rows

NEG_INF = float("-inf")
POS_INF = float("inf")


def page_bounds(
    keys: torch.Tensor, valid: torch.Tensor | None, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-page element-wise min and max of the prompt keys, ignoring padding.

    Pages start at each sequence's first real token (its left-padding length), so a padded
    sequence in a batch gets the same pages as alone.

    Args:
        keys: (B, Hk, T, D) prompt keys; valid: (B, T) bool (False = padding) or None.
    Returns:
        kmin, kmax: (B, Hk, P, D), P = ceil(longest real prompt / page_size); page_ok: (B, P) bool,
        False for pages past a sequence's end; start: (B, 1) first real position per sequence.
    """
    b, h, t, d = keys.shape
    start = first_real(valid, b, keys.device)  # (B, 1)
    p = math.ceil((t - int(start.min())) / page_size)
    pos = start + torch.arange(p * page_size, device=keys.device)  # (B, P*S)
    ok = pos < t
    paged = gather_rows(keys, pos.clamp(max=t - 1).unsqueeze(1))  # (B, Hk, P*S, D)
    okv = ok[:, None, :, None]
    kmin = paged.masked_fill(~okv, POS_INF).view(b, h, p, page_size, d).amin(dim=3)
    kmax = paged.masked_fill(~okv, NEG_INF).view(b, h, p, page_size, d).amax(dim=3)
    page_ok = ok.view(b, p, page_size).any(dim=-1)
    empty = ~page_ok[:, None, :, None]  # pages past a row's end: finite zeros, scored -inf later
    return kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0), page_ok, start


def page_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_ok: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k over each page, max over the query heads of each KV head.

    Args:
        query: (B, Hq, 1, D); kmin, kmax: (B, Hk, P, D); page_ok: (B, P).
    Returns:
        (B, Hk, P) float32; pages of padding only are -inf.
    """
    b, hq, _, d = query.shape
    hk = kmin.shape[1]
    q = query.reshape(b, hk, hq // hk, d).float()  # (B, Hk, g, D)
    # max(q*lo, q*hi) = q+ * hi + q- * lo element-wise, so the bound is two matmuls.
    bound = q.clamp(min=0) @ kmax.float().transpose(-1, -2) + q.clamp(max=0) @ kmin.float().transpose(-1, -2)
    bound = bound.amax(dim=2)  # (B, Hk, P)
    return bound.masked_fill(~page_ok[:, None, :], NEG_INF)


class QuestLayer(DenseLayer):
    """All rows kept (preallocated); a decode step reads the top pages + the generated rows."""

    supports_static = False  # the pages read change from step to step

    def __init__(self, budget: Budget, page_size: int) -> None:
        """budget: the method's checked budget (`Method.budget_rule`)."""
        super().__init__()
        self.budget = budget
        self.page_size = page_size
        self.prompt_len = 0
        self.decoding = False
        self.bounds: tuple[torch.Tensor, ...] | None = None  # kmin, kmax, page_ok, start
        self.num_pages = 0  # pages read per step in the current decode run
        self.selected_pages: torch.Tensor | None = None  # (B, Hk, p) last step's pages

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        first = self.seq_length == 0
        out = super().update(key_states, value_states, *args, **kwargs)
        if q > 1 or first:
            self.decoding = False
            self.prompt_len = self.seq_length
            self.bounds = None
        else:
            self.decoding = True
        return out

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        if not self.decoding:
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        t = self.prompt_len
        if self.bounds is None:
            valid = None if attention_mask is None else attention_mask[:, 0, -1, :t]
            self.bounds = page_bounds(key[:, :, :t], valid, self.page_size)
            pages = self.bounds[2].shape[-1]
            self.num_pages = min(pages, math.ceil(self.budget.tokens(t, clip=False) / self.page_size))
        kmin, kmax, page_ok, start = self.bounds
        scores = page_scores(query, kmin, kmax, page_ok)
        top = torch.topk(scores, self.num_pages, dim=-1, sorted=False).indices.sort(dim=-1).values
        self.selected_pages = top
        b, hk, p = top.shape
        offs = torch.arange(self.page_size, device=top.device)
        rows = (start.view(b, 1, 1, 1) + top[..., None] * self.page_size + offs).view(b, hk, p * self.page_size)
        in_prompt = rows < t
        gen = torch.arange(t, self.seq_length, device=top.device).expand(b, hk, self.seq_length - t)
        positions = torch.cat([rows.clamp(max=t - 1), gen], dim=-1)  # (B, Hk, n)
        keep = torch.cat([in_prompt, torch.ones_like(gen, dtype=torch.bool)], dim=-1)
        k_sel, v_sel = gather_rows(key, positions), gather_rows(value, positions)
        hq = query.shape[1]
        mask = subset_mask(attention_mask, positions, self.seq_length - 1, 1, hq)  # (B, Hq, 1, n)
        mask = mask & keep.repeat_interleave(hq // hk, dim=1)[:, :, None, :]
        # Rows read (a selected partial last page counts whole; no device sync to count exactly).
        self.last_attended = min(p * self.page_size, t) + (self.seq_length - t)
        return sdpa_attention_forward(module, query, k_sel, v_sel, mask, **kwargs)

    def _page_bytes(self) -> int:
        """The per-page min / max keys."""
        return 0 if self.bounds is None else sum(x.numel() * x.element_size() for x in self.bounds[:2])

    def device_bytes(self) -> int:
        return super().device_bytes() + self._page_bytes()

    def allocated_device_bytes(self) -> int:
        return super().allocated_device_bytes() + self._page_bytes()


class QuestCache(ManagedCache):
    method_name = "quest"

    def __init__(self, model: torch.nn.Module, budget: Budget, page_size: int, dense_layers: int) -> None:
        types = check_supported(model, "quest")
        cfg = text_config(model)
        layers = []
        for i, kind in enumerate(types):
            if kind == "sliding_attention":
                layers.append(make_sliding_layer(cfg))
            elif i < dense_layers:
                layers.append(DenseLayer())
            else:
                layers.append(QuestLayer(budget, page_size))
        self.budget = budget.value
        self.page_size = page_size
        super().__init__(model, layers)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        quest = [l for l in self.layers if isinstance(l, QuestLayer)]
        s["prompt_tokens"] = max((l.prompt_len for l in quest), default=0)
        s["budget"] = self.budget
        s["pages_per_step"] = max((l.num_pages for l in quest), default=0)
        s["page_size"] = self.page_size
        s["budgeted_layers"] = [i for i, l in enumerate(self.layers) if isinstance(l, QuestLayer)]
        return s


@register("quest")
@dataclass(eq=False)
class Quest(Method):
    """Options: `page_size` (16), `dense_layers` (2: the model's first layers attend densely)."""

    page_size: int = 16
    dense_layers: int = 2
    default_budget = DEFAULT_BUDGET

    def validate(self) -> None:
        check_int("page_size", self.page_size, 1)
        check_int("dense_layers", self.dense_layers, 0)

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        """Drop-free: every row stays on the device, plus each page's min and max keys (two key
        rows per page) on the budgeted layers (full-attention layers past `dense_layers`)."""
        key_row = ctx.row_bytes // 2
        meta = sum(
            2 * key_row * math.ceil(rows / self.page_size)
            for i, (kind, rows) in enumerate(zip(ctx.layer_types, ctx.full_rows))
            if i >= self.dense_layers and kind != "sliding_attention"
        )
        return KVPlan(ctx.full_kv_bytes + meta, 0, ["drop-free on the device: all KV + page metadata"], offload=False)

    def make_cache(self, model) -> QuestCache:
        return QuestCache(model, self.budget_rule, self.page_size, self.dense_layers)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": False,
            "page_size": self.page_size,
            "dense_layers": self.dense_layers,
            "budgeted_layers": f"full-attention layers with index >= {self.dense_layers}",
            "attended": "ceil(budget / page_size) prompt pages + every generated token per step",
            "device_kv": "every row (drop-free, no offload) + per-page min/max keys",
        }
