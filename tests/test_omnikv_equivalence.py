"""OmniKV against full attention (budget >= prompt) and against the slow reference (real budget)."""

import math

import pytest
import torch
from transformers import DynamicCache

from omnikv import OmniKVCache, OmniKVConfig
from omnikv.hf.compat import cache_kwargs
from omnikv.decoding.generation import teacher_forced_logits
from omnikv.methods import get_method
from reference import ReferenceOmniKV

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
# fp32 CPU: sdpa vs sdpa over the same rows in another memory layout differ by rounding only.
ATOL = 1e-4


def cfg_for(family: str, **kw) -> OmniKVConfig:
    if family == "gemma3_text":  # full-attention layers are 1, 3, 5
        base = dict(filter_layers=(1,), num_wait_layers=0)
    else:
        base = dict(filter_layers=(1, 3), num_wait_layers=0)
    base.update(kw)
    return OmniKVConfig(**base)


def prompt(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def left_padded_batch(seed_a: int, seed_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 140) ids and mask: row 0 = 40 padding tokens (id 256) + 100 real, row 1 = 140 real."""
    ids = torch.cat([torch.full((1, 40), 256), prompt(100, seed=seed_a)], dim=1)
    ids = torch.cat([ids, prompt(140, seed=seed_b)], dim=0)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_generate_equals_full_attention(models, family):
    model = models(family, num_hidden_layers=6)
    ids = prompt(120)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_kwargs(DynamicCache(config=model.config)))
        cache = OmniKVCache(model, cfg_for(family, budget=1.0, sink_tokens=0, recent_tokens=0))
        out = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(ref, out)
    st = cache.stats()
    sparse = [i for i, r in enumerate(st["layer_roles"]) if r == "sparse"]
    assert sparse, "the plan must contain sparse layers for this test to mean anything"
    # Every sparse layer attended to the whole prompt plus the generated tokens.
    assert all(st["attended_tokens_per_layer"][i] == st["seq_length"] for i in sparse)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_full_budget_logits_close(models, family):
    model = models(family, num_hidden_layers=6)
    ids = prompt(150, seed=1)[0].tolist()
    cont = prompt(10, seed=2)[0].tolist()
    full = teacher_forced_logits(model, ids, cont, "full")
    omni = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg_for(family, budget=1.0)))
    torch.testing.assert_close(omni, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("selector", ["last", "softmax_last", "uniform", "exp", "union"])
@pytest.mark.parametrize("head_reduce", ["max", "sum", "per_kv_head"])
def test_matches_reference_at_real_budget(models, selector, head_reduce):
    model = models("llama", num_hidden_layers=6)
    cfg = cfg_for("llama", budget=0.1, selector=selector, head_reduce=head_reduce, sink_tokens=2, recent_tokens=4, window_size=8)
    ids = prompt(200, seed=3)[0].tolist()
    cont = prompt(8, seed=4)[0].tolist()
    lib = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg))
    ref = ReferenceOmniKV(model, cfg).logits(ids, cont)
    torch.testing.assert_close(lib, ref, atol=ATOL, rtol=0)
    # A 10% budget is not full attention: the comparison above is not vacuous.
    full = teacher_forced_logits(model, ids, cont, "full")
    assert (lib - full).abs().max() > 10 * ATOL


def test_matches_reference_with_refresh_and_wait_layers(models):
    model = models("llama", num_hidden_layers=8)
    cfg = OmniKVConfig(filter_layers=(1, 4), num_wait_layers=1, budget=24, sink_tokens=2, recent_tokens=4, refresh_every=3)
    ids = prompt(180, seed=5)[0].tolist()
    cont = prompt(9, seed=6)[0].tolist()
    lib = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg))
    ref = ReferenceOmniKV(model, cfg).logits(ids, cont)
    torch.testing.assert_close(lib, ref, atol=ATOL, rtol=0)


def test_gemma_hybrid_matches_reference(models):
    model = models("gemma3_text", num_hidden_layers=6)
    cfg = cfg_for("gemma3_text", budget=0.15, sink_tokens=1, recent_tokens=8)
    ids = prompt(160, seed=7)[0].tolist()
    cont = prompt(6, seed=8)[0].tolist()
    lib = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg))
    ref = ReferenceOmniKV(model, cfg).logits(ids, cont)
    torch.testing.assert_close(lib, ref, atol=ATOL, rtol=0)


def test_offload_on_equals_off(models):
    model = models("llama", num_hidden_layers=6)
    ids = prompt(160, seed=9)[0].tolist()
    cont = prompt(8, seed=10)[0].tolist()
    on = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg_for("llama", budget=0.1, offload=True)))
    off = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg_for("llama", budget=0.1, offload=False)))
    assert torch.equal(on, off)


def test_chunked_prefill_is_identical(models):
    model = models("llama", num_hidden_layers=6)
    ids = prompt(170, seed=11)[0].tolist()
    cont = prompt(6, seed=12)[0].tolist()
    method = get_method("omnikv", config=cfg_for("llama", budget=0.1))
    one = teacher_forced_logits(model, ids, cont, method)
    chunked = teacher_forced_logits(model, ids, cont, method, prefill_chunk_size=48)
    torch.testing.assert_close(chunked, one, atol=ATOL, rtol=0)


def test_batch_with_left_padding_equals_full_attention(models):
    model = models("qwen2", num_hidden_layers=6)
    a = prompt(90, seed=13)[0]
    b = prompt(60, seed=14)[0]
    pad = 256
    ids = torch.full((2, 90), pad)
    mask = torch.zeros(2, 90, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 30:], mask[1, 30:] = b, 1
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad, **cache_kwargs(DynamicCache(config=model.config)))
        cache = OmniKVCache(model, cfg_for("qwen2", budget=1.0, sink_tokens=2, recent_tokens=4))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad, **cache_kwargs(cache))
    assert torch.equal(ref, out)


def test_batch_padding_is_never_selected(models):
    model = models("llama", num_hidden_layers=6)
    ids, mask = left_padded_batch(15, 16)
    cache = OmniKVCache(model, cfg_for("llama", budget=20, sink_tokens=2, recent_tokens=4))
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256, **cache_kwargs(cache))
    for idx in cache.selected_indices().values():
        assert idx.shape[-1] == 20
        assert (idx[0] >= 40).all(), "padding positions were selected"
        # sinks are the first real tokens of each sequence
        assert {40, 41} <= set(idx[0, 0].tolist())
        assert {0, 1} <= set(idx[1, 0].tolist())


def test_long_decode_through_buffer_growth_equals_full_attention(models):
    """Past the working buffer's first capacity (k + 64 rows) the selection must survive the
    reallocation: at full budget, 150 greedy tokens equal full attention's."""
    model = models("llama", num_hidden_layers=6)
    ids = prompt(60, seed=21)[0].tolist()
    cont = prompt(150, seed=22)[0].tolist()
    full = teacher_forced_logits(model, ids, cont, "full")
    omni = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg_for("llama", budget=1.0)))
    torch.testing.assert_close(omni, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("head_reduce", ["max", "per_kv_head"])
@pytest.mark.parametrize("offload", [False, True])
def test_partial_reload_equals_full_gather(models, head_reduce, offload):
    """Moving only the changed rows gives the same logits as gathering every row, and is really
    used (a budget of half the prompt keeps most rows from step to step)."""
    model = models("llama", num_hidden_layers=6)
    ids = prompt(160, seed=21)[0].tolist()
    cont = prompt(10, seed=22)[0].tolist()
    cfg = cfg_for("llama", budget=0.5, head_reduce=head_reduce, sink_tokens=2, recent_tokens=4, offload=offload)
    method = get_method("omnikv", config=cfg)
    caches = []
    make = method.make_cache
    method.make_cache = lambda m: caches.append(make(m)) or caches[-1]
    partial = teacher_forced_logits(model, ids, cont, method)
    full = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg.replace(partial_reload=False)))
    torch.testing.assert_close(partial, full, atol=ATOL, rtol=0)
    assert sum(seg.partial_loads for seg in caches[0].segments.values()) > 0
    ref = ReferenceOmniKV(model, cfg).logits(ids, cont)
    torch.testing.assert_close(partial, ref, atol=ATOL, rtol=0)


def test_partial_reload_with_left_padding(models):
    model = models("qwen2", num_hidden_layers=6)
    ids, mask = left_padded_batch(23, 24)
    outs, caches = [], []
    for partial in (True, False):
        cache = OmniKVCache(model, cfg_for("qwen2", budget=60, sink_tokens=2, recent_tokens=4, partial_reload=partial))
        with torch.inference_mode():
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=256,
                                       output_logits=True, return_dict_in_generate=True, **cache_kwargs(cache)))
        caches.append(cache)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[0].logits), torch.stack(outs[1].logits), atol=ATOL, rtol=0)
    assert sum(seg.partial_loads for seg in caches[0].segments.values()) > 0
    for idx in caches[0].selected_indices().values():
        assert (idx[0] >= 40).all(), "padding positions were selected"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    """The half-precision path (what CUDA runs) on CPU: at full budget OmniKV's logits match full
    attention's within half-precision rounding, at a real budget offload on == off and the partial
    reload == the full gather exactly, and nothing is silently upcast."""
    from omnikv.models.tiny import tiny_model

    model = tiny_model("llama", num_hidden_layers=6).to(dtype)
    ids = prompt(120, seed=31)[0].tolist()
    cont = prompt(8, seed=32)[0].tolist()
    full = teacher_forced_logits(model, ids, cont, "full")
    same = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg_for("llama", budget=1.0)))
    torch.testing.assert_close(same, full, atol=0.05, rtol=0.02)
    cfg = cfg_for("llama", budget=0.25, sink_tokens=2, recent_tokens=4)
    runs = [teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg.replace(**kw)))
            for kw in ({}, {"offload": True}, {"partial_reload": False})]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[2], atol=0.05, rtol=0.02)
    assert (runs[0] - full).abs().max() > 0.05  # a quarter of the prompt is not full attention
    cache = OmniKVCache(model, cfg)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_kwargs(cache))
        model(input_ids=torch.tensor([[cont[0]]]), **cache_kwargs(cache))
    assert all(seg.work.data.dtype == dtype and seg.bank.data.dtype == dtype for seg in cache.segments.values())


@pytest.mark.parametrize("selector", ["last", "union"])
def test_fractional_budget_is_each_rows_own(models, selector):
    """budget=0.25: a 60-token row selects ceil(0.25 * 60) = 15 of its own tokens whether it runs
    alone or left-padded beside a 100- or an 80-token row (not 25 or 20 of the padded width); the
    rest of its index list is its padding, masked. Its greedy tokens and scores do not change."""
    model = models("llama", num_hidden_layers=6)
    cfg = cfg_for("llama", budget=0.25, sink_tokens=2, recent_tokens=4, selector=selector, window_size=4)
    a = prompt(60, seed=31)

    def run(ids, mask):
        cache = OmniKVCache(model, cfg)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=256,
                                 output_scores=True, return_dict_in_generate=True, **cache_kwargs(cache))
        return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, dim=1), cache

    alone_tokens, alone_scores, _ = run(a, torch.ones_like(a))
    for width, seed in ((100, 32), (80, 33)):
        ids = torch.cat([torch.cat([torch.full((1, width - 60), 256), a], dim=1), prompt(width, seed=seed)], dim=0)
        mask = torch.ones_like(ids)
        mask[0, : width - 60] = 0
        tokens, scores, cache = run(ids, mask)
        assert torch.equal(tokens[0], alone_tokens[0])
        torch.testing.assert_close(scores[0], alone_scores[0], atol=ATOL, rtol=0)
        for idx in cache.selected_indices().values():
            assert idx.shape[-1] == math.ceil(0.25 * width)  # the longer row's k: shapes stay (B, G, k_max)
            real = idx[0, 0][idx[0, 0] >= width - 60]
            assert real.numel() == 15, "row 0 must select 15 of its own 60 tokens"
            assert idx[0, 0].unique().numel() == idx.shape[-1]  # padding fills, no duplicates


@pytest.mark.parametrize("selector,head_reduce", [("last", "max"), ("uniform", "per_kv_head"), ("softmax_last", "sum")])
def test_block_selection_matches_reference(models, selector, head_reduce):
    model = models("llama", num_hidden_layers=6)
    cfg = cfg_for("llama", budget=48, selector=selector, head_reduce=head_reduce, sink_tokens=2, recent_tokens=4,
                  window_size=8, selection_block=16)
    ids = prompt(203, seed=3)[0].tolist()  # 12 full blocks + 11 tokens: the last block is partial
    cont = prompt(8, seed=4)[0].tolist()
    lib = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg))
    ref = ReferenceOmniKV(model, cfg).logits(ids, cont)
    torch.testing.assert_close(lib, ref, atol=ATOL, rtol=0)
    tokens = teacher_forced_logits(model, ids, cont, get_method("omnikv", config=cfg.replace(selection_block=1)))
    assert (lib - tokens).abs().max() > 10 * ATOL  # blocks select another set than tokens: not vacuous


def test_block_selection_refuses_a_left_padded_batch(models):
    from omnikv.errors import ConfigError

    model = models("llama", num_hidden_layers=6)
    ids, mask = left_padded_batch(21, 22)
    cache = OmniKVCache(model, cfg_for("llama", budget=32, sink_tokens=2, recent_tokens=4, selection_block=16))
    with torch.inference_mode(), pytest.raises(ConfigError, match="selection_block=16 does not support left-padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=256,
                       **cache_kwargs(cache))
