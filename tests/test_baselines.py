"""Baseline methods (streaming_llm, h2o, snapkv, quest, infllm, tidaldecode, full_offload) on tiny random models.

Invariants per method, equivalence to full attention where the method's definition allows it,
agreement of `model.generate` and `omnikv.decoding.generation.generate`, batches with left padding (each
row must decode exactly as it does alone), chunked prefill and multi-turn sessions.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from omnikv.hf.compat import cache_kwargs

from omnikv.errors import ConfigError
from omnikv.decoding.generation import SamplingParams, Session, generate, teacher_forced_logits
from omnikv.methods import available_methods, get_method
from omnikv.hf.layers import DenseLayer
from omnikv.methods.lossy import LossyLayer
from omnikv.methods.quest import QuestLayer, page_bounds, page_scores
from omnikv.models.tiny import FAMILIES, build_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = 40  # prompt tokens
NEW = 6  # generated tokens (the cache sees NEW - 1 of them)
LOSSY = ("streaming_llm", "h2o", "snapkv")
BASELINES = LOSSY + ("quest", "infllm", "tidaldecode")
# tiny models: 2 KV heads x head_dim 16, float32 -> bytes of one row (key + value) of one layer
ROW_BYTES = 2 * 2 * 16 * 4


@functools.lru_cache(maxsize=None)
def model_of(family: str) -> torch.nn.Module:
    return tiny_model(family)


@functools.lru_cache(maxsize=None)
def eager_model_of(family: str) -> torch.nn.Module:
    """Same weights, eager attention: returns attention weights for reference scores."""
    m = tiny_model(family)
    m.set_attn_implementation("eager")
    return m


def prompt(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, ids, method, new: int = NEW, **kwargs):
    """Greedy `model.generate` through the method's cache; (new tokens (B, new), cache)."""
    cache = method.make_cache(model)
    with torch.inference_mode():
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    return out[:, ids.shape[1] :], cache


@functools.lru_cache(maxsize=None)
def full_tokens(family: str, seed: int = 0) -> tuple[int, ...]:
    out, _ = run(model_of(family), prompt(seed=seed), get_method("full"))
    return tuple(out[0].tolist())


def lossy_layers(cache) -> list[tuple[int, LossyLayer]]:
    return [(i, l) for i, l in enumerate(cache.layers) if isinstance(l, LossyLayer)]


# ---------------------------------------------------------------------------------------------
# registry, options, errors


def test_registry_lists_every_baseline_and_describes_it():
    names = available_methods()
    for name in BASELINES + ("full", "full_offload"):
        assert name in names
    for name in BASELINES:
        m = get_method(name, budget=0.25)
        d = m.describe()
        json.dumps(d)
        assert d["method"] == name and d["budget"] == 0.25
        assert d["lossy"] == (name in LOSSY)


@pytest.mark.parametrize(
    "name, options",
    [
        ("streaming_llm", {"budget": 4, "sink_tokens": 4}),
        ("streaming_llm", {"sink_tokens": -1}),
        ("h2o", {"budget": 10, "recent_tokens": 8, "sink_tokens": 4}),
        ("snapkv", {"pooling": "median"}),
        ("snapkv", {"kernel_size": 4}),
        ("snapkv", {"head_reduce": "sum"}),
        ("quest", {"page_size": 0}),
        ("quest", {"budget": 1.5}),
        ("h2o", {"budget": 0}),
        ("quest", {"no_such_option": 1}),
    ],
)
def test_bad_options_raise_config_errors(name, options):
    with pytest.raises(ConfigError):
        get_method(name, **options)


# ---------------------------------------------------------------------------------------------
# every method: equals full attention when the budget covers everything; both loops agree

FULL_BUDGET = {"streaming_llm": PROMPT + NEW, "h2o": PROMPT + NEW, "snapkv": 1.0, "quest": 1.0, "infllm": 1.0,
               "tidaldecode": 1.0}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BASELINES)
def test_budget_covering_everything_equals_full(family, name):
    """StreamingLLM/H2O keep prompt *and* generated rows in their budget, so theirs must cover
    both; SnapKV compresses the prompt only and Quest pages the prompt only."""
    out, cache = run(model_of(family), prompt(), get_method(name, budget=FULL_BUDGET[name]))
    assert tuple(out[0].tolist()) == full_tokens(family)
    assert all(l.evicted == 0 for _, l in lossy_layers(cache))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BASELINES)
def test_model_generate_and_generation_loop_agree(family, name):
    model = model_of(family)
    method = get_method(name, budget=16)
    out, cache = run(model, prompt(), method)
    res = generate(model, build_tokenizer(), prompt(), method, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert res.token_ids == out[0].tolist()
    stats = cache.stats()
    for key in ("device_kv_bytes", "host_kv_bytes", "h2d_bytes_per_step", "attended_tokens_per_layer"):
        assert key in stats and key in res.stats
    assert stats["host_kv_bytes"] == 0 and stats["h2d_bytes_per_step"] == 0


def test_full_offload_equals_full():
    out, cache = run(model_of("llama"), prompt(), get_method("full_offload"))
    assert tuple(out[0].tolist()) == full_tokens("llama")
    assert cache.stats()["method"] == "full_offload"


# ---------------------------------------------------------------------------------------------
# StreamingLLM


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_streaming_keeps_exactly_sinks_and_window(family):
    budget, sink = 16, 4
    model = model_of(family)
    out, cache = run(model, prompt(), get_method("streaming_llm", budget=budget, sink_tokens=sink))
    seen = PROMPT + NEW - 1
    expect = list(range(sink)) + list(range(seen - (budget - sink), seen))
    layers = lossy_layers(cache)
    assert layers, "every full-attention layer is budgeted"
    for _, layer in layers:
        assert layer.kept_positions()[0, 0].tolist() == expect
        assert layer.device_bytes() == budget * ROW_BYTES  # the prompt-sized buffers are gone
        assert layer.evicted == seen - budget
        assert layer.last_attended == budget + 1  # the kept rows + the new token itself
    stats = cache.stats()
    full = get_method("full_prealloc").make_cache(model)
    with torch.inference_mode():
        model(prompt(seen), **cache_kwargs(full))
    assert stats["device_kv_bytes"] < full.stats()["device_kv_bytes"]


def test_streaming_fraction_budget_resolves_on_the_prompt():
    _, cache = run(model_of("llama"), prompt(), get_method("streaming_llm", budget=0.25))
    for _, layer in lossy_layers(cache):
        assert layer.kept_budget == 10 and layer.store.live == 10  # ceil(0.25 * 40)


# ---------------------------------------------------------------------------------------------
# H2O


def eager_prefill_attention(family: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights (B, Hq, T, T) of every layer from an eager forward (the reference)."""
    with torch.inference_mode():
        out = eager_model_of(family)(ids, output_attentions=True, use_cache=False)
    return [a.float() for a in out.attentions]


def test_h2o_prefill_scores_are_column_sums_of_the_attention():
    family = "qwen3"
    model = model_of(family)
    cache = get_method("h2o", budget=8).make_cache(model)
    with torch.inference_mode():
        model(prompt(), **cache_kwargs(cache))
    ref = eager_prefill_attention(family, prompt())
    for i, layer in lossy_layers(cache):
        b, hq, t, _ = ref[i].shape
        expect = ref[i].sum(dim=2).view(b, 2, hq // 2, t).sum(dim=2)  # per KV head
        torch.testing.assert_close(layer.acc, expect, atol=1e-4, rtol=1e-4)


def test_h2o_first_compaction_keeps_the_heaviest_prompt_rows():
    family, k = "llama", 8
    ids = prompt()
    _, cache = run(model_of(family), ids, get_method("h2o", budget=k, recent_tokens=0), new=2)
    ref = eager_prefill_attention(family, ids)
    for i, layer in lossy_layers(cache):
        b, hq, t, _ = ref[i].shape
        score = ref[i].sum(dim=2).view(b, 2, hq // 2, t).sum(dim=2)
        top = score.topk(k, dim=-1).indices
        kept = layer.kept_positions()
        for h in range(2):
            allowed = set(top[0, h].tolist()) | {PROMPT}  # the prompt's top-k or the new token
            assert set(kept[0, h].tolist()) <= allowed
            assert len(kept[0, h]) == k


def test_h2o_never_evicts_sinks_or_recent_and_keeps_exactly_its_budget():
    model, budget, recent, sink = model_of("mistral"), 12, 4, 2
    cache = get_method("h2o", budget=budget, recent_tokens=recent, sink_tokens=sink).make_cache(model)
    seen = PROMPT
    with torch.inference_mode():
        logits = model(prompt(), **cache_kwargs(cache)).logits
        for _ in range(8):
            tok = logits[:, -1:].argmax(-1)
            logits = model(tok, **cache_kwargs(cache)).logits
            seen += 1
            for _, layer in lossy_layers(cache):
                kept = layer.kept_positions()  # (1, Hk, budget)
                assert kept.shape == (1, 2, budget)
                for h in range(2):
                    rows = set(kept[0, h].tolist())
                    assert set(range(sink)) <= rows
                    assert set(range(seen - recent, seen)) <= rows
                assert layer.device_bytes() == budget * ROW_BYTES
    assert all(l.evicted == seen - budget for _, l in lossy_layers(cache))


@pytest.mark.parametrize("family, budget, recent", [("llama", 16, 8), ("qwen3", 12, 4), ("mistral", 10, 0)])
def test_h2o_decodes_as_the_authors_real_drop_algorithm(family, budget, recent):
    """tests/reference.py ReferenceH2O: the authors' real-drop H2O written with lists and loops
    (heavy + recent = budget per KV head, all prompt queries vote, one eviction per step outside
    the recent window). Same logits at every step and the same rows kept at the end."""
    from reference import ReferenceH2O

    model = model_of(family)
    ids, cont = prompt()[0].tolist(), prompt(10, seed=5)[0].tolist()
    method = get_method("h2o", budget=budget, recent_tokens=recent)
    ref = ReferenceH2O(model, budget, recent)
    expect = ref.logits(ids, cont)
    sess = Session(model, build_tokenizer(), method)
    sess.append(torch.tensor([ids]))
    rows = [sess.feed()]
    for tok in cont[:-1]:
        rows.append(sess._forward([tok]))
    torch.testing.assert_close(torch.stack(rows), expect, atol=1e-4, rtol=0)
    for i, layer in lossy_layers(sess.cache):
        kept = layer.kept_positions()[0]
        for h in range(kept.shape[0]):
            assert kept[h].tolist() == sorted(ref.kept[i][h])
    full = teacher_forced_logits(model, ids, cont, "full")
    assert (expect - full).abs().max() > 1e-3  # evictions happened: the comparison is not vacuous


# ---------------------------------------------------------------------------------------------
# SnapKV


@pytest.mark.parametrize("family, pooling, head_reduce", [("llama", "max", "mean"), ("qwen2", "avg", "max")])
def test_snapkv_keeps_the_reference_selection_per_head(family, pooling, head_reduce):
    """Reference: eager attention of the last W prompt queries, summed, reduced over the query
    heads of each KV head, pooled (kernel 7), top budget - W; plus the window."""
    budget, window = 20, 8
    ids = prompt()
    method = get_method("snapkv", budget=budget, window_size=window, pooling=pooling, head_reduce=head_reduce)
    _, cache = run(model_of(family), ids, method)
    ref = eager_prefill_attention(family, ids)
    for i, layer in lossy_layers(cache):
        b, hq, t, _ = ref[i].shape
        votes = ref[i][:, :, t - window :, : t - window].sum(dim=2).view(b, 2, hq // 2, t - window)
        votes = votes.mean(dim=2) if head_reduce == "mean" else votes.amax(dim=2)
        pool = F.max_pool1d if pooling == "max" else functools.partial(F.avg_pool1d, count_include_pad=True)
        votes = pool(votes.view(2, 1, -1), 7, stride=1, padding=3).view(1, 2, -1)
        top = votes.topk(budget - window, dim=-1).indices
        kept = layer.kept_positions()
        generated = list(range(PROMPT, PROMPT + NEW - 1))
        for h in range(2):
            expect = sorted(top[0, h].tolist()) + list(range(t - window, t)) + generated
            assert kept[0, h].tolist() == expect  # budget prompt rows per head + every generated row
        assert layer.device_bytes() == (budget + NEW - 1) * ROW_BYTES


def test_snapkv_budget_smaller_than_window_keeps_the_newest_prompt_rows():
    _, cache = run(model_of("llama"), prompt(), get_method("snapkv", budget=5, window_size=32), new=2)
    for _, layer in lossy_layers(cache):
        assert layer.kept_positions()[0].tolist() == [list(range(35, 41))] * 2


# ---------------------------------------------------------------------------------------------
# Quest

def test_quest_page_bounds_and_scores_match_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    b, hk, hq, t, d, size = 2, 2, 4, 37, 8, 16
    keys, query = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hq, 1, d, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded by 5: its pages start at position 5
    kmin, kmax, page_ok, start = page_bounds(keys, valid, size)
    assert start.view(-1).tolist() == [0, 5] and kmin.shape == (b, hk, 3, d)
    assert page_ok.tolist() == [[True, True, True], [True, True, False]]
    scores = page_scores(query, kmin, kmax, page_ok)
    for bi in range(b):
        s0 = int(start[bi])
        for p in range(3):
            rows = list(range(s0 + p * size, min(s0 + (p + 1) * size, t)))
            if not rows:
                assert scores[bi, :, p].eq(float("-inf")).all()
                continue
            for h in range(hk):
                page = keys[bi, h, rows]
                torch.testing.assert_close(kmin[bi, h, p], page.amin(0))
                torch.testing.assert_close(kmax[bi, h, p], page.amax(0))
                qs = query[bi, 2 * h : 2 * h + 2, 0]  # the query heads of KV head h
                bound = torch.stack([torch.maximum(q * page.amin(0), q * page.amax(0)).sum() for q in qs]).max()
                torch.testing.assert_close(scores[bi, h, p], bound)
                assert bool(scores[bi, h, p] >= (qs @ page.T).max() - 1e-5)  # an upper bound


def test_quest_with_every_page_equals_full_attention_logits():
    """fp32 tolerance: gathering rows and masking the partial page may reorder sums (<= 1e-4)."""
    model, ids = model_of("llama"), prompt()
    out, cache = run(model, ids, get_method("quest", budget=PROMPT))
    assert tuple(out[0].tolist()) == full_tokens("llama")
    cont = list(full_tokens("llama"))
    ref = teacher_forced_logits(model, ids, cont, "full")
    got = teacher_forced_logits(model, ids, cont, get_method("quest", budget=PROMPT))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_quest_reads_its_pages_keeps_everything_and_first_layers_dense(family):
    model, budget = model_of(family), 20  # ceil(20 / 16) = 2 pages
    _, cache = run(model, prompt(), get_method("quest", budget=budget))
    stats = cache.stats()
    seen, generated = PROMPT + NEW - 1, NEW - 2  # at the last step: the rows before it + itself
    assert isinstance(cache.layers[0], DenseLayer) or cache.layers[0].is_sliding
    assert not isinstance(cache.layers[1], QuestLayer)
    quest = [i for i, l in enumerate(cache.layers) if isinstance(l, QuestLayer)]
    assert quest and min(quest) >= 2 and stats["pages_per_step"] == 2
    for i in quest:
        layer = cache.layers[i]
        assert layer.selected_pages.shape == (1, 2, 2)
        assert generated + 1 < stats["attended_tokens_per_layer"][i] <= 2 * 16 + generated + 1
        assert layer.buffer.length == seen  # drop-free: every row stays
    full = get_method("full_prealloc").make_cache(model)
    with torch.inference_mode():
        model(prompt(seen), **cache_kwargs(full))
    assert stats["device_kv_bytes"] >= full.stats()["device_kv_bytes"]


# ---------------------------------------------------------------------------------------------
# batches with left padding, chunked prefill, multi-turn


def padded_batch(long: int = 40, short: int = 30):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 256, (1, long), generator=g), torch.randint(0, 256, (1, short), generator=g)
    ids = torch.full((2, long), 256)
    ids[0], ids[1, long - short :] = a[0], b[0]
    mask = torch.ones(2, long, dtype=torch.long)
    mask[1, : long - short] = 0
    return ids, mask, a, b


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("name", BASELINES)
def test_left_padded_batch_decodes_each_row_as_alone_and_keeps_no_padding(family, name):
    model, budget = model_of(family), 12
    ids, mask, a, b = padded_batch()
    out, cache = run(model, ids, get_method(name, budget=budget), attention_mask=mask)
    alone_a, _ = run(model, a, get_method(name, budget=budget))
    alone_b, _ = run(model, b, get_method(name, budget=budget))
    assert out[0].tolist() == alone_a[0].tolist()
    assert out[1].tolist() == alone_b[0].tolist()
    pad = ids.shape[1] - b.shape[1]
    for _, layer in lossy_layers(cache):  # 30 real tokens > budget: no padding row is kept
        assert bool((layer.kept_positions()[1] >= pad).all())
    if name == "quest":
        for layer in cache.layers:
            if isinstance(layer, QuestLayer):
                assert layer.bounds[3].view(-1).tolist() == [0, pad]


@pytest.mark.parametrize("name", BASELINES)
def test_chunked_prefill_equals_one_pass(name):
    model, tok = model_of("qwen2"), build_tokenizer()
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    one = generate(model, tok, prompt(), get_method(name, budget=16), params)
    chunked = generate(model, tok, prompt(), get_method(name, budget=16), params, prefill_chunk_size=16)
    assert one.token_ids == chunked.token_ids


@pytest.mark.parametrize("name", BASELINES)
def test_multi_turn_session_keeps_the_budget(name):
    model, budget = model_of("llama"), 16
    sess = Session(model, build_tokenizer(), get_method(name, budget=budget))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    sess.append(prompt(30))
    sess.generate(params)
    sess.append(prompt(20, seed=1))  # a new turn extends the prompt of the kept rows
    res = sess.generate(params)
    assert len(res.token_ids) == 4 and res.stats["seq_length"] == 30 + 4 + 20 + 3
    for _, layer in lossy_layers(sess.cache):
        kept = layer.kept_positions()
        if name == "snapkv":  # budget prompt rows + the rows generated in this turn
            assert kept.shape[-1] == budget + 3
        else:
            assert kept.shape[-1] == budget
        assert int(kept.max()) == 30 + 4 + 20 + 3 - 1  # the newest row is always kept


# ---------------------------------------------------------------------------------------------
# the budget means the same for every method


@pytest.mark.parametrize("name, budget, expect", [
    ("streaming_llm", 20, 20), ("h2o", 20, 20), ("snapkv", 20, 20), ("quest", 20, 32), ("quest", 0.5, 32),
    ("infllm", 20, 20), ("infllm", 0.5, 24), ("tidaldecode", 20, 20), ("tidaldecode", 0.5, 24),
])
def test_first_decode_step_reads_budget_prompt_tokens(name, budget, expect):
    """48-token prompt: every budgeted layer attends to `expect` prompt rows + the new token
    (Quest: whole pages of 16, ceil(20 / 16) = 2 pages; 0.5 of 48 = 24 tokens -> 2 pages;
    TidalDecode: layers 0, 1 dense and 2 selects, on these 4-layer models)."""
    model = model_of("qwen3")
    cache = get_method(name, budget=budget).make_cache(model)
    with torch.inference_mode():
        model(prompt(48), **cache_kwargs(cache))
        model(torch.tensor([[7]]), **cache_kwargs(cache))
    attended = cache.stats()["attended_tokens_per_layer"]
    dense = {"quest": 2, "tidaldecode": 3}.get(name, 0)  # Quest: layers 0, 1 dense; TidalDecode: + layer 2
    budgeted = attended[dense:]
    assert budgeted and budgeted == [expect + 1] * len(budgeted)
    assert attended[:dense] == [49] * dense


# ---------------------------------------------------------------------------------------------
# a real model (embedded SmolLM2)


@pytest.mark.slow
def test_real_model_equals_full_with_a_covering_budget_and_shrinks_memory_with_a_small_one():
    from omnikv.models import load_model

    lm = load_model("smollm2", dtype="float32", device="cpu")
    text = "The quick brown fox jumps over the lazy dog. " * 12 + "Question: what does the fox jump over? Answer:"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    n = ids.shape[1]
    ref, full_cache = run(lm.model, ids, get_method("full_prealloc"), new=8)
    covering = {"streaming_llm": n + 8, "h2o": n + 8, "snapkv": 1.0, "quest": 1.0, "infllm": 1.0, "tidaldecode": 1.0}
    for name in BASELINES:
        out, _ = run(lm.model, ids, get_method(name, budget=covering[name]), new=8)
        assert out.tolist() == ref.tolist(), name
        _, small = run(lm.model, ids, get_method(name, budget=32), new=8)
        if name in LOSSY:
            assert small.stats()["device_kv_bytes"] < full_cache.stats()["device_kv_bytes"] / 2
