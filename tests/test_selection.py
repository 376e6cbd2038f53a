"""The vectorised selector against the loop reference, plus property tests of its invariants."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnikv.algorithm.selection import (
    filter_scores,
    gather_rows,
    select_topk,
    select_topk_blocks,
    select_topk_rows,
    union_scores,
)
from omnikv.config import OmniKVConfig
from omnikv.hf.masks import positions_mask
from omnikv.offload.delta import selection_delta
from reference import ref_reload, ref_scores, ref_select, ref_select_blocks


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("selector", ["last", "softmax_last", "uniform", "exp", "union"])
@pytest.mark.parametrize("head_reduce", ["max", "sum", "per_kv_head"])
def test_scores_match_reference(selector, head_reduce):
    q, k = rand(2, 6, 5, 8, seed=1), rand(2, 3, 40, 8, seed=2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :7] = False
    fast = filter_scores(q, k, 0.35, selector, head_reduce, valid)
    for b in range(2):
        ref = ref_scores(q[b], k[b], 0.35, selector, head_reduce, valid[b].tolist())
        for gi, row in enumerate(ref):
            for j, x in enumerate(row):
                if x == -math.inf:
                    assert fast[b, gi, j] == -math.inf
                else:
                    assert abs(fast[b, gi, j].item() - x) < 1e-4


@pytest.mark.parametrize("g", [1, 3])
def test_topk_matches_reference(g):
    scores = rand(2, g, 50, seed=3)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[0, :10] = False
    fast = select_topk(scores.masked_fill(~valid[:, None], -math.inf), 12, valid=valid, sink=3, recent=5)
    for b in range(2):
        for gi in range(g):
            s = scores[b, gi].masked_fill(~valid[b], -math.inf).tolist()
            assert fast[b, gi].tolist() == ref_select(s, 12, valid[b].tolist(), 3, 5)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    hk=st.integers(1, 3),
    g=st.integers(1, 3),
    t=st.integers(1, 70),
    budget=st.integers(1, 80),
    sink=st.integers(0, 5),
    recent=st.integers(0, 9),
    pad=st.integers(0, 20),
    head_reduce=st.sampled_from(["max", "sum", "per_kv_head"]),
    selector=st.sampled_from(["last", "softmax_last", "uniform", "exp"]),
    seed=st.integers(0, 10_000),
)
def test_selection_invariants(b, hk, g, t, budget, sink, recent, pad, head_reduce, selector, seed):
    """For any shape, padding and budget: k distinct sorted in-range positions per group,
    padding never chosen while real tokens remain, sink and recent always chosen."""
    q, keys = rand(b, hk * g, 4, 8, seed=seed), rand(b, hk, t, 8, seed=seed + 1)
    valid = torch.ones(b, t, dtype=torch.bool)
    pads = [min(pad * i, t - 1) for i in range(b)]  # sequence i has pads[i] left pads
    for i, p in enumerate(pads):
        valid[i, :p] = False
    k = min(budget, t)
    scores = filter_scores(q, keys, 0.3, selector, head_reduce, valid)
    idx = select_topk(scores, k, valid=valid, sink=sink, recent=recent)
    groups = hk if head_reduce == "per_kv_head" else 1
    assert idx.shape == (b, groups, k)
    for i in range(b):
        real = [j for j in range(t) if valid[i, j]]
        must = set(real[:sink]) | {j for j in range(t - recent, t) if j >= 0 and valid[i, j]}
        for gi in range(groups):
            row = idx[i, gi].tolist()
            assert row == sorted(set(row)), "indices must be distinct and ascending"
            assert all(0 <= j < t for j in row)
            chosen_pad = [j for j in row if not valid[i, j]]
            assert len(chosen_pad) == max(0, k - len(real)), "padding chosen while real tokens were left"
            if len(must) <= k:
                assert must <= set(row), "sink/recent tokens must always be selected"


def test_gather_rows_matches_indexing():
    x = rand(3, 2, 2, 4, 30, 5, seed=5)  # (L, 2, B, H, T, D)
    shared = torch.tensor([[[1, 4, 9]], [[0, 2, 29]]])  # (B, 1, k)
    per_head = torch.randint(0, 30, (2, 4, 3), generator=torch.Generator().manual_seed(6))
    for idx in (shared, per_head, shared[:1]):
        xb = x[:, :, : idx.shape[0]]
        out = gather_rows(xb, idx)
        for bi in range(idx.shape[0]):
            for h in range(4):
                rows = idx[bi, 0 if idx.shape[1] == 1 else h]
                assert torch.equal(out[:, :, bi, h], xb[:, :, bi, h][:, :, rows])


def test_positions_mask_gathers_columns():
    mask = torch.tensor([[False, True, True, True, True]]).view(1, 1, 1, 5)
    pos = torch.tensor([[[0, 2], [1, 4]]])  # (B=1, G=2, n=2)
    out = positions_mask(mask, pos, num_q_heads=4)
    assert out.shape == (1, 4, 1, 2)
    assert out[0, :2, 0].tolist() == [[False, True], [False, True]]
    assert out[0, 2:, 0].tolist() == [[True, True], [True, True]]
    assert positions_mask(None, pos, 4) is None


def _random_selections(b, g, k, t, overlap, seed):
    """(prev, new) (B, G, k): distinct positions per row; `new` keeps about `overlap` of `prev`."""
    gen = torch.Generator().manual_seed(seed)
    prev = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])
    new = prev.clone()
    for bi in range(b):
        for gi in range(g):
            row = prev[bi, gi]
            outside = torch.tensor([p for p in range(t) if p not in set(row.tolist())])
            n_swap = int(torch.randint(0, k + 1, (1,), generator=gen)) if overlap is None else round(k * (1 - overlap))
            swap = torch.randperm(k, generator=gen)[:n_swap]
            new[bi, gi, swap] = outside[torch.randperm(len(outside), generator=gen)[:n_swap]]
            new[bi, gi] = new[bi, gi].sort().values
    return prev, new


@pytest.mark.parametrize("b,g,overlap", [(1, 1, 0.8), (1, 1, 0.0), (1, 1, 1.0), (2, 1, None), (2, 3, None)])
def test_selection_delta_matches_reference(b, g, overlap):
    k, t = 12, 50
    for seed in range(5):
        prev, new = _random_selections(b, g, k, t, overlap, seed)
        slots, tokens = selection_delta(prev, new, t)
        after = prev.scatter(-1, slots, tokens)
        changed = [len(set(new[bi, gi].tolist()) - set(prev[bi, gi].tolist())) for bi in range(b) for gi in range(g)]
        assert slots.shape[-1] == max(changed)  # no more columns than the busiest row needs
        for bi in range(b):
            for gi in range(g):
                assert after[bi, gi].tolist() == ref_reload(prev[bi, gi].tolist(), new[bi, gi].tolist())
                assert len(set(slots[bi, gi].tolist())) == slots.shape[-1]  # no slot written twice


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.sampled_from([1, 3]), st.integers(1, 16), st.integers(0, 10_000))
def test_reloads_keep_the_buffer_equal_to_a_full_gather(b, g, k, seed):
    """A chain of partial reloads into a packed buffer always holds exactly the rows a full gather
    of the current selection would, for shared and per-head selections."""
    from omnikv.offload.layouts import scatter_rows as _scatter_rows

    t, h = 24, 3
    k = min(k, t)
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(2, 2, b, h, t, 4, generator=gen)  # (L, 2, B, H, T, D)
    held = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])
    buffer = gather_rows(bank, held).clone()
    for _ in range(4):
        scores = torch.rand(b, g, t, generator=gen)
        new = select_topk(scores, k)
        slots, tokens = selection_delta(held, new, t)
        _scatter_rows(buffer, slots, gather_rows(bank, tokens))
        held = held.scatter(-1, slots, tokens)
        assert torch.equal(held.sort(-1).values, new)
        assert torch.equal(buffer, gather_rows(bank, held))


def test_union_takes_each_selectors_best_in_turn():
    """k = 4 of 8: last's best (5), uniform's best (0), last's second (6), uniform's second (1);
    a token both rank high in counts once, so the next of either ranking gets its place."""
    last = torch.tensor([[[0.0, 1, 2, 3, 4, 9, 8, 5]]])
    window = torch.tensor([[[9.0, 8, 1, 2, 3, 0, 4, 5]]])
    assert select_topk(union_scores(last, window), 4).tolist() == [[[0, 1, 5, 6]]]
    shared = torch.tensor([[[9.0, 8, 0, 1, 2, 3, 4, 5]]])  # same best two: the next ones join
    assert select_topk(union_scores(shared, shared), 3).tolist() == [[[0, 1, 7]]]
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    scores = union_scores(shared, window, valid)
    assert scores[0, 0, :2].tolist() == [float("-inf")] * 2
    assert set(select_topk(scores, 3, valid=valid)[0, 0].tolist()) <= set(range(2, 8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_rows_picks_what_each_row_picks_alone(seed):
    """Row b of a left-padded batch with its own k: its real picks = ref_select on its unpadded
    scores (shifted by its padding); the rest are distinct padding positions."""
    g = torch.Generator().manual_seed(seed)
    b, grp, t = 3, 2, 30
    pads = [0, 7, 12]
    valid = torch.ones(b, t, dtype=torch.bool)
    for i, p in enumerate(pads):
        valid[i, :p] = False
    scores = torch.randn(b, grp, t, generator=g).masked_fill(~valid[:, None, :], float("-inf"))
    ks = torch.tensor([9, 5, 4])
    idx = select_topk_rows(scores, ks, valid, sink=1, recent=2)
    assert idx.shape == (b, grp, 9)
    for i, p in enumerate(pads):
        for j in range(grp):
            row = idx[i, j].tolist()
            assert len(set(row)) == 9 and row == sorted(row)
            real = [x for x in row if x >= p]
            alone = ref_select(scores[i, j, p:].tolist(), int(ks[i]), None, 1, 2)
            assert real == [x + p for x in alone]
            assert all(x < p for x in row if x not in real)


@settings(max_examples=80, deadline=None)
@given(
    g=st.integers(1, 3),
    t=st.integers(1, 90),
    block=st.integers(2, 17),
    budget=st.integers(1, 100),
    sink=st.integers(0, 9),
    recent=st.integers(0, 20),
    seed=st.integers(0, 1000),
)
def test_block_selection_matches_reference_and_keeps_whole_blocks(g, t, block, budget, sink, recent, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budgets that round up to blocks: said, and meant here
        cfg = OmniKVConfig(budget=max(budget, sink + recent), sink_tokens=sink, recent_tokens=recent, selection_block=block)
    rows = cfg.resolve_budget(t)
    scores = rand(2, g, t, seed=seed)
    fast = select_topk_blocks(scores, rows, block, sink=sink, recent=recent)
    assert fast.shape == (2, g, rows)  # the size the sparse layers' buffers are made for
    for b in range(2):
        for gi in range(g):
            got = fast[b, gi].tolist()
            assert got == ref_select_blocks(scores[b, gi].tolist(), rows, block, sink, recent)
            blocks = {p // block for p in got}
            assert got == sorted(p for x in blocks for p in range(x * block, min(x * block + block, t)))
            assert (t - 1) // block in blocks and set(range(min(sink, t))) <= set(got)
            assert set(range(max(t - recent, 0), t)) <= set(got)


def test_blocks_of_one_token_select_what_token_selection_selects():
    scores = rand(2, 3, 60, seed=9)
    cfg = OmniKVConfig(budget=20, sink_tokens=2, recent_tokens=3)
    tokens = select_topk(scores, cfg.resolve_budget(60), sink=2, recent=3)
    assert torch.equal(select_topk_blocks(scores, cfg.resolve_budget(60), 1, sink=2, recent=3), tokens)


def test_a_block_wins_by_its_best_token():
    scores = torch.zeros(1, 1, 64)
    scores[0, 0, 37] = 5.0  # block 2 of 16 holds the best token; block 0 is the sink, 3 the last
    got = select_topk_blocks(scores, 48, 16, sink=1, recent=1)
    assert got[0, 0].tolist() == list(range(0, 16)) + list(range(32, 64))


@pytest.mark.parametrize("nan_share", [1.0, 0.5])
def test_nan_scores_never_crowd_out_the_forced_positions_or_the_budget(nan_share):
    """A NaN score (an overflowed query or key) ranks below every real one: the sink, recent and
    last positions stay in, and the budget holds, for tokens, per-row budgets and blocks. topk alone
    ranks NaN above the +inf of the forced positions (the vLLM backend's 49-block tables at 16K)."""
    t, k, sink, recent, block = 96, 24, 2, 4, 8
    scores = rand(1, 2, t, seed=5)
    nan = torch.rand(1, 2, t, generator=torch.Generator().manual_seed(6)) < nan_share
    scores = scores.masked_fill(nan, float("nan"))
    forced = set(range(sink)) | set(range(t - recent, t))
    got = select_topk(scores, k, sink=sink, recent=recent)
    assert got.shape == (1, 2, k)
    for g in range(2):
        picked = set(got[0, g].tolist())
        assert forced <= picked and len(picked) == k
        real = [i for i in range(t) if not nan[0, g, i]]
        # Real scores come before NaN ones: a NaN position is picked only once every real one is.
        if any(nan[0, g, i] and i not in forced for i in picked):
            assert set(real) <= picked
    rows = select_topk_rows(scores, torch.tensor([k]), torch.ones(1, t, dtype=torch.bool), sink=sink, recent=recent)
    assert forced <= set(rows[0, 0].tolist())
    blocks = select_topk_blocks(scores, 4 * block, block, sink=sink, recent=recent)
    chosen = {p // block for p in blocks[0, 0].tolist()}
    assert len(chosen) == 4 and {0, (t - 1) // block} <= chosen
