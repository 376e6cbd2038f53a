"""Slow, obviously correct references for OmniKV (test-only).

Nothing here shares code with the fast path except the layer-role plan (`omnikv.algorithm.roles`), which
has its own tests. Scores are computed per head with explicit dot products, top-k by sorting a
Python list, the sparse set by list indexing, and attention as softmax(q.k) . v per head.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from omnikv.hf.compat import cache_kwargs, layer_types
from omnikv.config import OmniKVConfig
from omnikv.algorithm.roles import Role, plan_layers

REF_NAME = "omnikv_reference"


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, attention, prompt: list[int], continuation: list[int],
                     on_step=None) -> torch.Tensor:
    """(len(continuation), V): next-token logits after prompt + continuation[:i], teacher-forced
    over a stock DynamicCache with `attention` as the model's attention function. It is registered
    here, at each call, not when a reference is built: a later reference's registration would
    otherwise replace an earlier one's under the same name. `on_step()` runs before each decode
    step."""
    AttentionInterface.register(REF_NAME, attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation(REF_NAME)
    try:
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt]), use_cache=True, **cache_kwargs(cache))
        rows = [out.logits[0, -1].float()]
        for tok in continuation[:-1]:
            if on_step is not None:
                on_step()
            out = model(torch.tensor([[tok]]), use_cache=True, **cache_kwargs(cache))
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)
    finally:
        model.set_attn_implementation(prev)


# --------------------------------------------------------------------------- selection
def ref_scores(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, selector: str, head_reduce: str, valid: list[bool] | None
) -> list[list[float]]:
    """One sequence. queries (Hq, W, D), keys (Hk, T, D) -> scores per index group: [G][T]."""
    if selector == "union":  # last's and uniform's best in turn: see ref_union
        last = ref_scores(queries, keys, scaling, "last", head_reduce, valid)
        window = ref_scores(queries, keys, scaling, "uniform", head_reduce, valid)
        return [ref_union(a, b, valid) for a, b in zip(last, window)]
    hq, w_all, _ = queries.shape
    hk, t, _ = keys.shape
    g = hq // hk
    rows = [w_all - 1] if selector in ("last", "softmax_last") else list(range(w_all))
    valid = valid if valid is not None else [True] * t
    # per_head[h][w][t]
    per_head = []
    for h in range(hq):
        per_w = []
        for w in rows:
            logits = [float(torch.dot(queries[h, w].double(), keys[h // g, j].double())) * scaling for j in range(t)]
            logits = [x if valid[j] else -math.inf for j, x in enumerate(logits)]
            if selector != "last":
                m = max(logits)
                exps = [math.exp(x - m) if valid[j] else 0.0 for j, x in enumerate(logits)]
                s = sum(exps)
                logits = [e / s if valid[j] else -math.inf for j, e in enumerate(exps)]
            per_w.append(logits)
        per_head.append(per_w)
    groups = [list(range(hq))] if head_reduce in ("max", "sum") else [list(range(kv * g, kv * g + g)) for kv in range(hk)]
    n_rows = len(rows)
    if selector == "exp":
        weights = [2.0 ** -(n_rows - 1 - i) for i in range(n_rows)]
    else:
        weights = [1.0] * n_rows
    out = []
    for heads in groups:
        scores = []
        for j in range(t):
            total = 0.0
            for i in range(n_rows):
                vals = [per_head[h][i][j] for h in heads]
                red = sum(vals) if head_reduce == "sum" else max(vals)
                total += weights[i] * red if red != -math.inf else -math.inf
            scores.append(total)
        out.append(scores)
    return out


def ref_union(first: list[float], second: list[float], valid: list[bool] | None) -> list[float]:
    """Interleave two rankings: token j scores max(2 * rank_first(j) + 1, 2 * rank_second(j)),
    ranks ascending (0 = worst), ties broken by position; padding -inf."""
    def ranks(xs: list[float]) -> list[int]:
        order = sorted(range(len(xs)), key=lambda j: (xs[j], j))
        out = [0] * len(xs)
        for r, j in enumerate(order):
            out[j] = r
        return out

    ra, rb = ranks(first), ranks(second)
    valid = valid if valid is not None else [True] * len(first)
    return [float(max(2 * ra[j] + 1, 2 * rb[j])) if valid[j] else -math.inf for j in range(len(first))]


def ref_select(scores: list[float], k: int, valid: list[bool] | None, sink: int, recent: int) -> list[int]:
    """Top-k positions (ascending) with the first `sink` real and last `recent` tokens forced."""
    t = len(scores)
    valid = valid if valid is not None else [True] * t
    real = [j for j in range(t) if valid[j]]
    forced = set(real[:sink]) | {j for j in range(max(t - recent, 0), t) if valid[j]}
    order = sorted(range(t), key=lambda j: (j not in forced, -scores[j] if scores[j] != -math.inf else math.inf))
    return sorted(order[: min(k, t)])


def ref_select_blocks(scores: list[float], rows: int, block: int, sink: int, recent: int) -> list[int]:
    """Block selection, explicitly: block b holds positions [b*block, (b+1)*block) of the prompt,
    scores its best token; the blocks holding a sink token, a recent token or the last token are
    forced; then the best blocks until the selection holds `rows` prompt positions."""
    t = len(scores)
    members = [list(range(b, min(b + block, t))) for b in range(0, t, block)]
    best = [max(scores[j] for j in m) for m in members]
    forced = {j // block for j in list(range(min(sink, t))) + list(range(max(t - recent, 0), t)) + [t - 1]}
    order = sorted(range(len(members)), key=lambda b: (b not in forced, -best[b]))
    chosen: list[int] = []
    for b in order:
        if sum(len(members[c]) for c in chosen) >= rows and len(chosen) >= len(forced):
            break
        chosen.append(b)
    return sorted(j for b in chosen for j in members[b])


def ref_reload(prev: list[int], new: list[int]) -> list[int]:
    """The slot contents after a partial reload: every slot whose position stays selected keeps
    it; the others take the newly selected positions, in the order the new selection lists them."""
    incoming = iter([p for p in new if p not in prev])
    return [p if p in new else next(incoming) for p in prev]


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query per head, explicit. q (Hq, D), k/v (Hk, n, D) -> (Hq, D)."""
    hq, hk = q.shape[0], k.shape[0]
    g = hq // hk
    out = []
    for h in range(hq):
        w = torch.softmax((k[h // g] @ q[h]) * scaling, dim=-1)
        out.append(w @ v[h // g])
    return torch.stack(out)


# --------------------------------------------------------------------------- decode
class ReferenceOmniKV:
    """OmniKV decoding over transformers' stock DynamicCache (batch 1).

    The stock cache holds every token of every layer; at a decode step filter layers select with
    the reference functions above and sparse layers attend, explicitly, to the selected prompt
    rows plus every generated token.
    """

    def __init__(self, model: torch.nn.Module, config: OmniKVConfig) -> None:
        self.model = model
        self.config = config
        self.plan = plan_layers(config, layer_types(model.config))
        self.prompt_len = 0
        self.windows: dict[int, torch.Tensor] = {}
        self.selection: dict[int, list[list[int]]] = {}
        self.steps = 0
        self.last_select: dict[int, int] = {}

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        role = self.plan.roles[i]
        cfg = self.config
        scaling = kwargs.get("scaling") or module.scaling
        if role is Role.FILTER:
            w = query if i not in self.windows else torch.cat([self.windows[i], query], dim=2)
            self.windows[i] = w[:, :, -cfg.window_size :]
        if query.shape[2] > 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if role is Role.FILTER and (i not in self.last_select or self.steps - self.last_select[i] >= cfg.refresh_every):
            n = self.prompt_len
            q = self.windows[i][0] if cfg.selector in ("uniform", "exp", "union") else query[0]
            groups = ref_scores(q, key[0, :, :n], scaling, cfg.selector, cfg.head_reduce, None)
            k = cfg.resolve_budget(n)
            if cfg.selection_block > 1:
                self.selection[i] = [ref_select_blocks(s, k, cfg.selection_block, cfg.sink_tokens, cfg.recent_tokens)
                                     for s in groups]
            else:
                self.selection[i] = [ref_select(s, k, None, cfg.sink_tokens, cfg.recent_tokens) for s in groups]
            self.last_select[i] = self.steps
        if role is not Role.SPARSE:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        sel = self.selection[self.plan.source_filter[i]]
        n_total = key.shape[2]
        hk = key.shape[1]
        ks, vs = [], []
        for h in range(hk):
            rows = sel[0 if len(sel) == 1 else h] + list(range(self.prompt_len, n_total))
            ks.append(key[0, h, rows])
            vs.append(value[0, h, rows])
        out = ref_attention(query[0, :, 0], torch.stack(ks), torch.stack(vs), scaling)
        module.last_reference_rows = len(rows)
        return out[None, None], None  # (1, 1, Hq, D)

    def logits(self, prompt: list[int], continuation: list[int]) -> torch.Tensor:
        """(len(continuation), V): next-token logits after prompt + continuation[:i]."""
        self.prompt_len = len(prompt)
        return reference_logits(self.model, self._attention, prompt, continuation, on_step=self._count_step)

    def _count_step(self) -> None:
        self.steps += 1


# --------------------------------------------------------------------------- H2O
class ReferenceH2O:
    """H2O as its authors' real-drop code runs it (batch 1), over a stock DynamicCache.

    Per layer and KV head: a list of kept positions and their accumulated attention (the softmax
    weights every query gave them, summed over the query heads of the KV head). End of the prompt:
    keep the last `recent` prompt tokens and the `budget - recent` heaviest before them. Each decode
    step: attend over the kept rows + the new token, add the step's weights to the scores (the new
    token starts with its own), and when more than `budget` rows are kept drop the lightest row
    outside the last `recent`. Attention as softmax(q.k) . v per head, scores in float64 lists.
    """

    def __init__(self, model: torch.nn.Module, budget: int, recent: int) -> None:
        self.model, self.budget, self.recent = model, budget, recent
        self.kept: dict[int, list[list[int]]] = {}  # layer -> per KV head, kept positions (cache order)
        self.score: dict[int, list[list[float]]] = {}

    @staticmethod
    def _probs(q: torch.Tensor, keys: torch.Tensor, scaling: float) -> list[float]:
        logits = [float(q.double() @ k.double()) * scaling for k in keys]
        m = max(logits)
        exps = [math.exp(x - m) for x in logits]
        return [e / sum(exps) for e in exps]

    def _prefill(self, i: int, query, key, scaling: float) -> None:
        hq, t = query.shape[1], query.shape[2]
        hk = key.shape[1]
        g = hq // hk
        self.kept[i], self.score[i] = [], []
        for kv in range(hk):
            col = [0.0] * t
            for h in range(kv * g, kv * g + g):
                for p in range(t):  # causal: query p sees keys 0..p
                    for m, w in enumerate(self._probs(query[0, h, p], key[0, kv, : p + 1], scaling)):
                        col[m] += w
            heavy_pool = list(range(max(t - self.recent, 0)))
            heavy = sorted(heavy_pool, key=lambda m: -col[m])[: max(self.budget - self.recent, 0)]
            keep = sorted(heavy) + list(range(max(t - self.recent, 0), t))
            keep = keep[-self.budget :] if len(keep) > self.budget else keep
            self.kept[i].append(keep)
            self.score[i].append([col[m] for m in keep])

    def _decode(self, i: int, query, key, value, scaling: float) -> torch.Tensor:
        hq, hk = query.shape[1], key.shape[1]
        g = hq // hk
        new = key.shape[2] - 1
        out = []
        for kv in range(hk):
            rows, score = self.kept[i][kv] + [new], self.score[i][kv] + [0.0]
            for h in range(kv * g, kv * g + g):
                w = self._probs(query[0, h, 0], key[0, kv, rows], scaling)
                out.append((h, torch.tensor(w, dtype=value.dtype) @ value[0, kv, rows]))
                score = [s + x for s, x in zip(score, w)]
            if len(rows) > self.budget:  # drop the lightest row outside the recent window
                pool = range(len(rows) - self.recent)
                drop = min(pool, key=lambda j: (score[j], j))
                rows, score = rows[:drop] + rows[drop + 1 :], score[:drop] + score[drop + 1 :]
            self.kept[i][kv], self.score[i][kv] = rows, score
        return torch.stack([o for _, o in sorted(out, key=lambda x: x[0])])

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        scaling = kwargs.get("scaling") or module.scaling
        if query.shape[2] > 1:
            self._prefill(i, query, key, scaling)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return self._decode(i, query, key, value, scaling)[None, None], None  # (1, 1, Hq, D)

    def logits(self, prompt: list[int], continuation: list[int]) -> torch.Tensor:
        """(len(continuation), V): next-token logits after prompt + continuation[:i]."""
        return reference_logits(self.model, self._attention, prompt, continuation)
