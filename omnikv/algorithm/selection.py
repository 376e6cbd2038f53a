"""The Context Selector as pure tensor functions (no transformers import).

Shapes: B batch, Hq query heads, Hk KV heads, g = Hq // Hk, W observation window, T prompt length,
D head dim, k selected tokens, G index groups (1 when heads share one index set, Hk for
`per_kv_head`). `tests/reference.py` holds a slow loop-based twin of every function here.
"""

from __future__ import annotations

import torch

from omnikv.budget import block_selection, forced_blocks
from omnikv.config import QUERY_SELECTORS, WINDOW_SELECTORS  # noqa: F401 - the selector vocabulary

NEG_INF = float("-inf")
POS_INF = float("inf")


def window_weights(selector: str, window: int, device: torch.device) -> torch.Tensor:
    """Weights over an observation window of `window` queries, oldest first. Shape (window,)."""
    if selector == "exp":
        age = torch.arange(window - 1, -1, -1, device=device, dtype=torch.float32)
        return torch.pow(2.0, -age)
    return torch.ones(window, device=device, dtype=torch.float32)


def filter_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    selector: str,
    head_reduce: str,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every prompt token for selection.

    Args:
        queries: (B, Hq, W, D) post-RoPE queries, newest last. `last`/`softmax_last` use only the
            newest; `uniform`/`exp` use the whole window; `union` both (see `union_scores`).
        keys: (B, Hk, T, D) post-RoPE prompt keys of the filter layer.
        scaling: the attention scale (1/sqrt(D) for most models).
        valid: (B, T) bool, False for padding; None = all valid.

    Returns:
        (B, G, T) float32 scores, G = Hk for `per_kv_head` else 1. Padding scores -inf.
    """
    b, hq, _, d = queries.shape
    hk = keys.shape[1]
    g = hq // hk
    if selector in QUERY_SELECTORS:
        queries = queries[:, :, -1:, :]
    w = queries.shape[2]
    # (B, Hk, g*W, D) @ (B, Hk, D, T) -> (B, Hk, g, W, T); matmul per KV head avoids repeat_kv.
    q = queries.reshape(b, hk, g * w, d).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling).view(b, hk, g, w, -1)
    return scores_from_logits(logits, selector, head_reduce, valid)


def scores_from_logits(
    logits: torch.Tensor, selector: str, head_reduce: str, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, Hk, g, W, T) scaled attention logits -> (B, G, T) selection scores (see filter_scores)."""
    logits = logits.float()
    w = logits.shape[3]
    if selector == "union":
        last = scores_from_logits(logits[:, :, :, -1:], "last", head_reduce, valid)
        window = scores_from_logits(logits, "uniform", head_reduce, valid)
        return union_scores(last, window, valid)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, None, :], NEG_INF)
    if selector == "last":
        per_head = logits
    else:
        per_head = torch.softmax(logits, dim=-1)
        if valid is not None:
            # Softmax left zeros on padding; keep padding strictly below every real token.
            per_head = per_head.masked_fill(~valid[:, None, None, None, :], NEG_INF)
    reduced = _reduce_heads(per_head, head_reduce)  # (B, G, W, T)
    if selector in ("uniform", "exp"):
        weights = window_weights(selector, w, logits.device)
        return (reduced * weights[None, None, :, None]).sum(dim=2)
    return reduced[:, :, -1, :]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T) int64 rank of each entry in ascending order (ties: lower index first)."""
    order = x.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def union_scores(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose top-k is the union of the two selectors' best, taken in turn.

    Each token scores max(2 * rank_first + 1, 2 * rank_second): the k highest are `first`'s best,
    `second`'s best, `first`'s second best, ... skipping tokens already in (all scores distinct, so
    the top-k is unique). Why: `last` (first) follows the current query, the window (second)
    remembers what the prompt's last queries and the first answer tokens looked at; a token either
    ranks high in gets in, each with half of the budget when they disagree.

    Args:
        first, second: (B, G, T) scores; valid: (B, T) bool (False = padding) or None.
    Returns:
        (B, G, T) float32; padding -inf.
    """
    out = torch.maximum(2 * _ranks(first) + 1, 2 * _ranks(second)).float()
    if valid is not None:
        out = out.masked_fill(~valid[:, None, :], NEG_INF)
    return out


def _reduce_heads(x: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """(B, Hk, g, W, T) -> (B, G, W, T)."""
    if head_reduce == "max":
        return x.amax(dim=(1, 2)).unsqueeze(1)
    if head_reduce == "sum":
        return x.sum(dim=(1, 2)).unsqueeze(1)
    if head_reduce == "per_kv_head":
        return x.amax(dim=2)
    raise ValueError(f"unknown head_reduce {head_reduce!r}")


def forced_mask(
    valid: torch.Tensor | None, batch: int, length: int, sink: int, recent: int, device
) -> torch.Tensor | None:
    """(B, T) bool: tokens always selected: the first `sink` real tokens and the last `recent`.

    With left padding a sequence's first real token is at its padding length, so sinks are
    counted from there.
    """
    if sink == 0 and recent == 0:
        return None
    forced = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if recent:
        forced[:, max(length - recent, 0) :] = True
    if sink:
        if valid is None:
            forced[:, :sink] = True
        else:
            start = (~valid).sum(dim=1, keepdim=True)  # (B, 1) padding length
            pos = torch.arange(length, device=device)[None, :]
            forced |= (pos >= start) & (pos < start + sink)
    if valid is not None:
        forced &= valid
    return forced


def never_nan(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores ranked below every real one (-inf).

    torch.topk orders NaN above +inf, so a NaN score (a NaN query or key: stock vLLM gave SmolLM2
    NaN states past its 8K positions, docs/vllm.md) would beat the forced sink,
    recent and last positions, which are forced by setting them to +inf: the selection would then
    drop them and, under vLLM, the sparse table would span every block after the last selected one
    (measured: 49 blocks attended instead of 9 at 16K). With NaN as -inf, the forced positions and
    the budget hold whatever the scores are."""
    return scores.masked_fill(scores.isnan(), NEG_INF)


def select_topk(
    scores: torch.Tensor,
    k: int,
    *,
    valid: torch.Tensor | None = None,
    sink: int = 0,
    recent: int = 0,
) -> torch.Tensor:
    """Pick `k` prompt positions per index group, sorted ascending.

    Args:
        scores: (B, G, T) from `filter_scores`.
        valid: (B, T) bool, False for padding (never chosen unless fewer than k real tokens).
    Returns:
        (B, G, k) int64 positions in [0, T).
    """
    b, _, t = scores.shape
    k = min(k, t)
    scores = never_nan(scores)
    forced = forced_mask(valid, b, t, sink, recent, scores.device)
    if forced is not None:
        scores = scores.masked_fill(forced[:, None, :], POS_INF)
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def select_topk_rows(
    scores: torch.Tensor,
    ks: torch.Tensor,
    valid: torch.Tensor,
    *,
    sink: int = 0,
    recent: int = 0,
) -> torch.Tensor:
    """`select_topk` with a budget of its own per row of a left-padded batch.

    Row b gets its best `ks[b]` tokens, exactly those it would pick alone; the other
    k_max - ks[b] entries of its index list are its own padding positions, which the attention
    mask hides, so the shape stays (B, G, k_max) and no row's attention depends on the others.

    Args:
        scores: (B, G, T); ks: (B,) int64 tokens per row, each <= that row's real tokens and
            k_max - ks[b] <= its padding; valid: (B, T) bool, False = padding.
    Returns:
        (B, G, k_max) int64 positions in [0, T), sorted ascending.
    """
    b, g, t = scores.shape
    k_max = int(ks.max())
    scores = never_nan(scores)
    forced = forced_mask(valid, b, t, sink, recent, scores.device)
    if forced is not None:
        scores = scores.masked_fill(forced[:, None, :], POS_INF)
    best = torch.topk(scores, k_max, dim=-1, sorted=True).indices  # (B, G, k_max), best first
    rank = torch.arange(k_max, device=scores.device)
    short = rank[None, :] >= ks[:, None]  # (B, k_max): slots past the row's own budget
    if bool(short.any()):
        pad_first = torch.argsort(valid.to(torch.uint8), dim=-1, stable=True)  # (B, T) padding first
        filler = pad_first.gather(-1, (rank[None, :] - ks[:, None]).clamp(min=0))  # (B, k_max)
        best = torch.where(short[:, None, :], filler[:, None, :].expand(b, g, k_max), best)
    return torch.sort(best, dim=-1).values


def block_scores(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Pool token scores into blocks of `block` positions by their max.

    Args:
        scores: (B, G, T) token scores (-inf = never chosen).
    Returns:
        (B, G, ceil(T / block)); the last block pools only the tokens it has.
    """
    b, g, t = scores.shape
    nb = -(-t // block)
    if nb * block != t:
        scores = torch.nn.functional.pad(scores, (0, nb * block - t), value=NEG_INF)
    return scores.view(b, g, nb, block).amax(dim=-1)


def select_blocks(pooled: torch.Tensor, n: int, forced: list[int]) -> torch.Tensor:
    """Pick `n` blocks per index group, the `forced` ones (`omnikv.budget.forced_blocks`) first.

    Args:
        pooled: (B, G, NB) block scores from `block_scores`.
    Returns:
        (B, G, n) int64 block ids, ascending.
    """
    pooled = never_nan(pooled)
    if forced:
        pooled = pooled.clone()
        pooled[..., forced] = POS_INF
    idx = torch.topk(pooled, min(n, pooled.shape[-1]), dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def block_positions(blocks: torch.Tensor, block: int, prompt_len: int) -> torch.Tensor:
    """Prompt positions of ascending block ids whose last entry is the prompt's last block.

    Args:
        blocks: (B, G, n) int64 ascending, each row ending with (prompt_len - 1) // block.
    Returns:
        (B, G, rows) int64 ascending, rows = n * block minus the positions past the prompt (all in
        the last block, so they are the tail).
    """
    b, g, n = blocks.shape
    pos = (blocks.unsqueeze(-1) * block + torch.arange(block, device=blocks.device)).view(b, g, n * block)
    past = -(-prompt_len // block) * block - prompt_len
    return pos[..., : n * block - past]


def select_topk_block_ids(scores: torch.Tensor, rows: int, block: int, *, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """The blocks `select_topk_blocks` keeps, as block ids (what a paged cache's block table takes).

    Args:
        scores: (B, G, T) token scores of a T-token prompt; rows: the selection's size in prompt
            rows, `OmniKVConfig.resolve_budget(T)` (or any token budget: it rounds up to blocks,
            `omnikv.budget.block_selection`).
    Returns:
        (B, G, n) int64 block ids ascending, the forced ones (`omnikv.budget.forced_blocks`) among them.
    """
    t = scores.shape[-1]
    n, _ = block_selection(t, rows, block, sink, recent)
    return select_blocks(block_scores(scores, block), n, forced_blocks(t, block, sink, recent))


def select_topk_blocks(scores: torch.Tensor, rows: int, block: int, *, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """`select_topk` at block granularity (OmniKVConfig.selection_block > 1), no padding.

    Args:
        scores: (B, G, T) token scores of a T-token prompt; rows: as for `select_topk_block_ids`.
    Returns:
        (B, G, rows') int64 positions ascending: every prompt position of the chosen blocks.
    """
    blocks = select_topk_block_ids(scores, rows, block, sink=sink, recent=recent)
    return block_positions(blocks, block, scores.shape[-1])


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows along the token axis, the same positions for every leading slice.

    Args:
        x: (..., B, H, T, D), e.g. a packed bank (L, 2, B, H, T, D).
        idx: (B, G, k) with G = 1 (shared by all heads) or G = H.
    Returns:
        (..., B, H, k, D)
    """
    b, g, k = idx.shape
    if b == 1 and g == 1:
        # index_select on one axis is several times faster than gather / advanced indexing.
        return x.index_select(x.dim() - 2, idx[0, 0])
    h = x.shape[-3]
    bi = torch.arange(b, device=idx.device).view(b, 1, 1)
    hi = torch.arange(h, device=idx.device).view(1, h, 1)
    ti = idx.expand(b, h, k) if g == 1 else idx
    return x[..., bi, hi, ti, :]
