"""Baseline methods (streaming_llm, h2o, snapkv, quest, full_offload) on tiny random models.

Invariants per method, equivalence to full attention where the method's definition allows it,
agreement of `model.generate` and `omnikv.generation.generate`, batches with left padding (each
row must decode exactly as it does alone), chunked prefill and multi-turn sessions.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from omnikv.errors import ConfigError
from omnikv.generation import SamplingParams, Session, generate, teacher_forced_logits
from omnikv.methods import available_methods, get_method
from omnikv.methods._lossy import LossyLayer
from omnikv.testing import FAMILIES, build_tokenizer, tiny_model

PROMPT = 40  # prompt tokens
NEW = 6  # generated tokens (the cache sees NEW - 1 of them)
LOSSY = ("streaming_llm", "h2o", "snapkv")
BASELINES = LOSSY
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
        out = model.generate(ids, cache=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
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
        m = get_method(name, budget=0.25, model=model_of("llama"))  # `model=` as the CLI passes it
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

FULL_BUDGET = {"streaming_llm": PROMPT + NEW, "h2o": PROMPT + NEW, "snapkv": 1.0, "quest": 1.0}


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
        model(prompt(seen), cache=full)
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
        model(prompt(), cache=cache)
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
        logits = model(prompt(), cache=cache).logits
        for _ in range(8):
            tok = logits[:, -1:].argmax(-1)
            logits = model(tok, cache=cache).logits
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
        pool = F.max_pool1d if pooling == "max" else functools.partial(F.avg_pool1d, count_include_pad=False)
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
