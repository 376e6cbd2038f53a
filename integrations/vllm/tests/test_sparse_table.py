"""The sparse block table: its rows name exactly the selected + generated blocks, and vLLM's stock
kernel over it attends exactly those tokens (compared with attention over the rows gathered
explicitly)."""

import pytest
import torch
import torch.nn.functional as F

from omnikv_vllm.paged import TileLayout
from omnikv_vllm.sparse_table import attended_positions, sparse_block_table
from vllm import _custom_ops as ops

HK, HQ, D = 3, 9, 64


def _rows(seed: int, bs: int, rows: int = 4, nb: int = 12):
    """Random decode rows: (block_table (R, nb), selected (R, n) padded, seq_lens (R,), prompt lens)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.stack([torch.randperm(64, generator=g)[:nb] for _ in range(rows)]).to(torch.int32)
    sel, seqs, prompts = [], [], []
    for _ in range(rows):
        p = int(torch.randint(bs + 1, (nb - 3) * bs, (1,), generator=g))
        s = p + int(torch.randint(1, 2 * bs + 2, (1,), generator=g))
        last = (p - 1) // bs
        picks = torch.randperm(last, generator=g)[: int(torch.randint(0, last + 1, (1,), generator=g))]
        sel.append(sorted(set(picks.tolist()) | {last}))
        seqs.append(s)
        prompts.append(p)
    width = max(map(len, sel))
    padded = torch.tensor([s + [s[-1]] * (width - len(s)) for s in sel])
    return table, padded, torch.tensor(seqs, dtype=torch.int32), sel


@pytest.mark.parametrize("seed", range(6))
def test_each_row_names_its_selected_and_generated_blocks_in_order(seed):
    bs = 16
    table, selected, seq_lens, sel = _rows(seed, bs)
    sparse, lens = sparse_block_table(table, selected, seq_lens, bs)
    for r in range(len(sel)):
        want = attended_positions(sel[r], int(seq_lens[r]), bs)
        assert int(lens[r]) == len(want)
        # Logical position j of the sparse table is physical (block, slot): the same token as want[j].
        for j in range(int(lens[r])):
            logical = want[j]
            assert int(sparse[r, j // bs]) == int(table[r, logical // bs]) and j % bs == logical % bs


def test_the_stock_kernel_over_the_sparse_table_attends_exactly_those_tokens():
    bs, dtype, isa = 32, torch.float32, "vec"
    nblocks = 64
    table, selected, seq_lens, sel = _rows(7, bs, rows=3)
    g = torch.Generator().manual_seed(8)
    kv = torch.zeros(nblocks, HK, bs, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(nblocks, HK, 2 * bs, D).chunk(2, dim=2)
    for r in range(len(sel)):  # fill every row's tokens through the stock writer
        s = int(seq_lens[r])
        slots = table[r].to(torch.int64)[torch.arange(s) // bs] * bs + torch.arange(s) % bs
        ops.cpu_attn_reshape_and_cache(torch.randn(s, HK, D, generator=g), torch.randn(s, HK, D, generator=g),
                                       key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
    sparse, lens = sparse_block_table(table, selected, seq_lens, bs)
    q = torch.randn(len(sel), HQ, D, generator=g)
    starts = torch.arange(len(sel) + 1, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(sel), num_heads=HQ, num_kv_heads=HK, head_dim=D, seq_lens=lens, dtype=dtype,
        query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=starts,
        seq_lens=lens, scale=D**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=sparse, softcap=0, scheduler_metadata=meta, s_aux=None)
    layout = TileLayout.probe(bs, D, dtype, isa)
    for r in range(len(sel)):
        pos = torch.tensor(attended_positions(sel[r], int(seq_lens[r]), bs))
        k, v = layout.gather(kv, table[r], pos)
        want = F.scaled_dot_product_attention(q[r].view(1, HQ, 1, D), k[None], v[None], scale=D**-0.5,
                                              enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)
    assert int(lens.min()) < int(seq_lens.min())  # rows attend fewer tokens than they hold: not vacuous
