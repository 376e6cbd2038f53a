"""Block selection from the paged cache equals the library's (HF path) block selection, and under
tensor parallelism every worker selects what one worker holding every head selects.

TP is tested with a simulated group (two workers, each with half the KV heads, an all-gather that
stacks their tensors in rank order): see docs/vllm.md for why not with vLLM's own workers here."""

import pytest
import torch

from omnikv.algorithm.selection import filter_scores, select_topk_blocks
from omnikv.config import OmniKVConfig
from omnikv_vllm.paged import TileLayout
from omnikv_vllm.select import reduce_across_workers, row_token_scores, select_row_blocks
from vllm import _custom_ops as ops

HK, HQ, D, BS = 4, 12, 64, 32


def _cache(prompt_len: int, seed: int, dtype=torch.float32, isa="vec", nblocks=40):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(prompt_len, HK, D, generator=g).to(dtype)
    blocks = torch.randperm(nblocks, generator=g)[: -(-prompt_len // BS)]
    slots = blocks[torch.arange(prompt_len) // BS] * BS + torch.arange(prompt_len) % BS
    kv = torch.zeros(nblocks, HK, BS, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(nblocks, HK, 2 * BS, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, torch.zeros_like(keys), key_cache, value_cache, slots.to(torch.int64), isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    q = torch.randn(HQ, D, generator=g).to(dtype)
    return kv, blocks, keys, q


def _cfg(**kw):
    base = dict(budget=128, sink_tokens=4, recent_tokens=16, selection_block=BS)
    base.update(kw)
    return OmniKVConfig(**base)


@pytest.mark.parametrize("dtype,isa", [(torch.float32, "vec"), (torch.bfloat16, "vec"), (torch.float32, "vec16")])
def test_block_keys_are_the_stored_keys(dtype, isa):
    bs = 16 if isa == "vec16" else BS
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3 * bs, HK, D, generator=g).to(dtype)
    kv = torch.zeros(5, HK, bs, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(5, HK, 2 * bs, D).chunk(2, dim=2)
    blocks = torch.tensor([4, 0, 2])
    slots = blocks[torch.arange(3 * bs) // bs] * bs + torch.arange(3 * bs) % bs
    ops.cpu_attn_reshape_and_cache(keys, torch.zeros_like(keys), key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    layout = TileLayout.probe(bs, D, dtype, isa)
    got = layout.block_keys(kv, blocks)  # (Hk, D, 3 * bs)
    assert torch.equal(got.permute(2, 0, 1), keys)
    # The gather path (another layout) reads the same keys.
    other = TileLayout(layout.block_size, layout.head_dim, layout.key_offsets, layout.value_offsets, False)
    assert torch.equal(other.block_keys(kv, blocks), got)


@pytest.mark.parametrize("dtype,isa,column_major", [(torch.float32, "vec", True), (torch.bfloat16, "vec", True),
                                                     (torch.float32, "vec", False), (torch.bfloat16, "vec16", True)])
@pytest.mark.parametrize("chunk_bytes", [1, 2 * HK * BS * D * 4, 1 << 30])
def test_block_logits_read_chunk_by_chunk_equal_the_product_with_all_keys(dtype, isa, column_major, chunk_bytes):
    """The streamed scorer against its reference, q @ every block's keys copied out at once: chunks
    of one block, of a few blocks (the last one partial: 10 blocks), of all of them; both layout paths."""
    bs = 16 if isa == "vec16" else BS
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(24, HK, bs, 2 * D, generator=g).to(dtype)
    blocks = torch.randperm(24, generator=g)[:10]
    layout = TileLayout.probe(bs, D, dtype, isa)
    if not column_major:
        layout = TileLayout(layout.block_size, layout.head_dim, layout.key_offsets, layout.value_offsets, False)
    q = torch.randn(HK, HQ // HK, D, generator=g).to(dtype)
    got = layout.block_logits(kv, blocks, q, chunk_bytes=chunk_bytes)
    want = torch.matmul(q.float(), layout.block_keys(kv, blocks).float())
    assert got.shape == (HK, HQ // HK, 10 * bs) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("selector,head_reduce", [("last", "max"), ("last", "sum"), ("softmax_last", "max")])
@pytest.mark.parametrize("prompt_len", [300, 320, 97])
def test_paged_block_selection_equals_the_library(selector, head_reduce, prompt_len):
    cfg = _cfg(selector=selector, head_reduce=head_reduce)
    kv, blocks, keys, q = _cache(prompt_len, seed=prompt_len)
    layout = TileLayout.probe(BS, D, torch.float32, "vec")
    scores = row_token_scores(layout.block_logits(kv, blocks, q.view(HK, -1, D)), D**-0.5, prompt_len, cfg)
    lib_scores = filter_scores(q.view(1, HQ, 1, D), keys.transpose(0, 1)[None], D**-0.5, selector, head_reduce)
    torch.testing.assert_close(scores, lib_scores[0], atol=1e-5, rtol=1e-5)
    chosen = select_row_blocks(scores, prompt_len, BS, cfg)
    positions = select_topk_blocks(lib_scores, cfg.resolve_budget(prompt_len), BS, sink=4, recent=16)[0, 0]
    assert sorted({int(p) // BS for p in positions}) == chosen.tolist()
    assert chosen[-1] == (prompt_len - 1) // BS


@pytest.mark.parametrize("head_reduce", ["max", "sum"])
def test_tensor_parallel_workers_select_what_one_worker_with_every_head_selects(head_reduce):
    cfg = _cfg(head_reduce=head_reduce, budget=160)
    lens = (300, 200)
    layout = TileLayout.probe(BS, D, torch.float32, "vec")
    rows = [_cache(n, seed=10 + n) for n in lens]
    whole = [row_token_scores(layout.block_logits(kv, b, q.view(HK, -1, D)), D**-0.5, n, cfg)
             for (kv, b, _, q), n in zip(rows, lens)]
    want = [select_row_blocks(s, n, BS, cfg) for s, n in zip(whole, lens)]
    # Worker w holds KV heads [2w, 2w+2) and their query heads (vLLM's TP split of a GQA layer).
    local = []
    for w in range(2):
        kvh, qh = slice(2 * w, 2 * w + 2), slice(6 * w, 6 * w + 6)
        local.append([row_token_scores(layout.block_logits(kv[:, kvh].contiguous(), b, q[qh].view(2, -1, D)),
                                       D**-0.5, n, cfg) for (kv, b, _, q), n in zip(rows, lens)])
    flat = [torch.cat(scores, dim=-1)[None] for scores in local]  # what each worker contributes

    def gather(x):  # the simulated all-gather: every worker's tensor, in rank order
        return torch.cat(flat, dim=0)

    for w in range(2):
        reduced = reduce_across_workers(local[w], head_reduce, gather)
        got = [select_row_blocks(s, n, BS, cfg) for s, n in zip(reduced, lens)]
        assert [g.tolist() for g in got] == [x.tolist() for x in want]
        for s, x in zip(reduced, whole):
            torch.testing.assert_close(s, x, atol=1e-5, rtol=1e-5)
    # Without the reduction a worker's own heads pick other blocks: the test can fail.
    alone = [select_row_blocks(s, n, BS, cfg).tolist() for s, n in zip(local[0], lens)]
    alone1 = [select_row_blocks(s, n, BS, cfg).tolist() for s, n in zip(local[1], lens)]
    assert alone != alone1 or alone != [x.tolist() for x in want]
