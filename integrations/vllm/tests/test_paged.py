"""Gathering rows from vLLM's CPU paged cache equals the stock writer's input and the stock
kernel's view of the cache (fp32 and bf16, both CPU layouts)."""

import pytest
import torch
import torch.nn.functional as F

from omnikv_vllm.paged import TileLayout
from vllm import _custom_ops as ops

HK, HQ, D = 3, 9, 64


def _filled_cache(dtype, isa, bs, seq, num_blocks=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(seq, HK, D, generator=g).to(dtype)
    values = torch.randn(seq, HK, D, generator=g).to(dtype)
    blocks = torch.randperm(num_blocks, generator=g)[: (seq + bs - 1) // bs]  # scattered blocks
    slots = blocks[torch.arange(seq) // bs] * bs + torch.arange(seq) % bs
    kv = torch.zeros(num_blocks, HK, bs, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(num_blocks, HK, 2 * bs, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots.to(torch.int64), isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    block_row = torch.zeros(16, dtype=torch.int32)
    block_row[: len(blocks)] = blocks.to(torch.int32)
    return kv, key_cache, value_cache, keys, values, block_row


CASES = [(torch.float32, "vec", 32), (torch.bfloat16, "vec", 32), (torch.float32, "vec16", 16),
         (torch.bfloat16, "vec16", 16)]


@pytest.mark.parametrize("dtype,isa,bs", CASES)
def test_gather_returns_the_rows_the_stock_writer_stored(dtype, isa, bs):
    kv, _, _, keys, values, block_row = _filled_cache(dtype, isa, bs, seq=70)
    layout = TileLayout.probe(bs, D, dtype, isa)
    pos = torch.tensor([0, 1, 5, 31, 32, 33, 47, 64, 69])
    k, v = layout.gather(kv, block_row, pos)
    assert k.shape == (HK, len(pos), D) and k.dtype == dtype
    assert torch.equal(k, keys[pos].transpose(0, 1))
    assert torch.equal(v, values[pos].transpose(0, 1))


@pytest.mark.parametrize("dtype,isa,bs", CASES)
def test_attention_over_all_gathered_rows_matches_the_stock_kernel(dtype, isa, bs):
    seq = 70
    kv, key_cache, value_cache, _, _, block_row = _filled_cache(dtype, isa, bs, seq, seed=1)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = D**-0.5
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([seq], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HQ, num_kv_heads=HK, head_dim=D, seq_lens=seq_lens, dtype=dtype,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
    stock = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=stock, query_start_loc=qsl,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=block_row[None], softcap=0, scheduler_metadata=meta, s_aux=None)
    k, v = TileLayout.probe(bs, D, dtype, isa).gather(kv, block_row, torch.arange(seq))
    ours = F.scaled_dot_product_attention(q.view(1, HQ, 1, D), k[None], v[None], scale=scale, enable_gqa=True)[0, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), stock[0].float(), atol=tol, rtol=tol)
