"""Block selection of the decode rows of one step, from the paged cache (the library's rules).

Per decode row, a filter layer scores the row's prompt tokens with the row's query over whole key
blocks read in the kernel's layout (`TileLayout.block_logits`: a chunk of blocks at a time, one GEMM
per KV head and chunk),
turns the logits into the library's token scores (`omnikv.algorithm.selection.scores_from_logits`),
and keeps whole blocks with the library's block rules (`select_topk_block_ids`: the forced blocks and
the budget rounded up to blocks, `omnikv.budget`): the same blocks as the HF path with
`selection_block` = the cache's block size.

Tensor parallelism: each worker holds Hk / W of the KV heads, so its head-reduced scores are a
partial max (or sum) over heads. The token scores of all rows are all-gathered across the TP group
(vLLM's `tensor_model_parallel_all_gather`) and reduced with the config's head reduction before any
pooling or top-k, so every worker selects the same blocks, the ones a single worker holding every
head would select.

Shapes: Hq query heads, Hk KV heads (on this worker), g = Hq // Hk, D head dim, bs block size,
P prompt tokens, G = 1 index group, W TP workers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omnikv.algorithm.selection import scores_from_logits, select_topk_block_ids
from omnikv.config import OmniKVConfig

# (1, G, S) local scores -> (W, G, S) every worker's, in rank order.
Gather = Callable[[torch.Tensor], torch.Tensor]


def row_token_scores(logits: torch.Tensor, scale: float, prompt_len: int, config: OmniKVConfig) -> torch.Tensor:
    """logits (Hk, g, T >= P) float32, the row's query against its prompt blocks, unscaled
    (`TileLayout.block_logits`) -> (G, P) float32 token scores."""
    hk, g, _ = logits.shape
    logits = logits[:, :, :prompt_len] * scale
    return scores_from_logits(logits.view(1, hk, g, 1, prompt_len), config.selector, config.head_reduce)[0]


def reduce_across_workers(scores: list[torch.Tensor], head_reduce: str, gather: Gather | None) -> list[torch.Tensor]:
    """Every row's (G, P_r) scores reduced over the TP group's heads (None: one worker, as is).
    One all-gather for all rows: they are concatenated along the token axis."""
    if gather is None or not scores:
        return scores
    flat = torch.cat(scores, dim=-1)[None]  # (1, G, sum P_r)
    every = gather(flat.contiguous())  # (W, G, sum P_r)
    reduced = every.amax(dim=0) if head_reduce == "max" else every.sum(dim=0)
    return list(torch.split(reduced, [s.shape[-1] for s in scores], dim=-1))


def select_row_blocks(scores: torch.Tensor, prompt_len: int, block_size: int, config: OmniKVConfig) -> torch.Tensor:
    """(G, P) token scores -> (n,) int64 selected logical blocks, ascending (the library's rule)."""
    rows = config.resolve_budget(prompt_len)
    return select_topk_block_ids(scores[None], rows, block_size, sink=config.sink_tokens,
                                 recent=config.recent_tokens)[0, 0]


def pad_rows(selected: list[torch.Tensor]) -> torch.Tensor:
    """Rows of different lengths -> (R, n_max), each padded by repeating its own last entry (a
    duplicate block counts once in `sparse_block_table`)."""
    width = max(s.numel() for s in selected)
    return torch.stack([torch.cat([s, s[-1:].expand(width - s.numel())]) for s in selected])


def tp_gather() -> Gather | None:
    """vLLM's all-gather over the tensor-parallel group, or None with one worker."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

    if get_tensor_model_parallel_world_size() == 1:
        return None
    return lambda x: tensor_model_parallel_all_gather(x, dim=0)
