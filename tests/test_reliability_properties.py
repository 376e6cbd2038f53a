"""Property-based tests of OmniKVCache's bookkeeping (hypothesis): random tiny models and requests.

Each example draws a tiny model (family, layers, KV heads), an OmniKV config (filter layers, wait
layers, budget, selector, head reduction, refresh interval, offload) and a request (batch, prompt
length, left padding, decode steps), runs `model.generate` through an OmniKVCache and checks the
invariants of OmniKV (docs/how-it-works.md):

* the cache's length is the logical length (prompt incl. padding + fed tokens);
* a sparse layer attends to exactly resolve_budget(prompt) + fed tokens, every full-attention
  dense/filter layer to everything;
* drop-free: every sparse layer's bank holds every row, and its prompt rows are the rows full
  attention computes;
* the selection is k distinct sorted prompt positions, keeps sink and recent tokens, and picks no
  padding while there are enough real tokens;
* with budget >= prompt the logits equal full attention's (1e-4);
* stats are non-negative and agree with the above.

Selection-level properties live in tests/test_selection.py. Examples are few (this file runs in well
under a minute): hypothesis explores, the fixed seeds of test_omnikv_* pin.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from omnikv.algorithm.cache import OmniKVCache
from omnikv.algorithm.layers import SparseLayer
from omnikv.config import HEAD_REDUCTIONS, SELECTORS, OmniKVConfig
from omnikv.algorithm.roles import Role
from omnikv.hf.compat import cache_kwargs
from omnikv.models.tiny import tiny_model

_MODELS: dict[tuple, torch.nn.Module] = {}


def model_for(family: str, layers: int, kv_heads: int) -> torch.nn.Module:
    key = (family, layers, kv_heads)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(family, seed=layers * 10 + kv_heads, num_hidden_layers=layers, num_key_value_heads=kv_heads)
    return _MODELS[key]


@dataclass
class Case:
    family: str
    layers: int
    kv_heads: int
    config: OmniKVConfig
    batch: int
    prompt_len: int
    pads: list[int]  # left padding per row (row 0 has none)
    new_tokens: int  # generate() calls: 1 prefill + new_tokens - 1 decode forwards
    seed: int


@st.composite
def cases(draw, full_budget: bool = False) -> Case:
    family = draw(st.sampled_from(["llama", "llama", "qwen3", "gemma3_text"]))
    layers = draw(st.integers(2, 6) if family != "gemma3_text" else st.integers(4, 6))
    kv_heads = draw(st.sampled_from([1, 2, 4]))  # 4 query heads: MHA, GQA, MQA
    full = list(range(layers)) if family != "gemma3_text" else [i for i in range(layers) if i % 2 == 1]
    # Filters on any full-attention layer but the last, so that sparse layers usually exist.
    filters = draw(st.lists(st.sampled_from(full[:-1]), min_size=1, max_size=2, unique=True))
    wait = draw(st.integers(0, 2))
    if not any(f2 is not None for f2 in _sparse_sources(full, sorted(filters), wait)):
        wait = 0  # keep wait layers only where they leave a sparse layer behind
    sink = draw(st.integers(0, 3))
    recent = draw(st.integers(0, 4))
    prompt_len = draw(st.integers(1, 40))
    if full_budget:
        budget: int | float = draw(st.sampled_from([1.0, prompt_len, prompt_len + 7, 10**6]))
        budget = max(budget, sink + recent) if isinstance(budget, int) else budget
    else:
        budget = draw(st.one_of(st.integers(max(sink + recent, 1), 48), st.floats(0.01, 1.0)))
    config = OmniKVConfig(
        filter_layers=tuple(sorted(filters)),
        num_wait_layers=wait,
        budget=budget,
        selector=draw(st.sampled_from(SELECTORS)),
        head_reduce=draw(st.sampled_from(HEAD_REDUCTIONS)),
        window_size=draw(st.integers(1, 6)),
        sink_tokens=sink,
        recent_tokens=recent,
        offload=draw(st.booleans()),
        refresh_every=draw(st.integers(1, 3)),
    )
    batch = draw(st.integers(1, 3))
    pads = [0] + [draw(st.integers(0, prompt_len - 1)) for _ in range(batch - 1)]
    return Case(family, layers, kv_heads, config, batch, prompt_len, pads, draw(st.integers(2, 5)), draw(st.integers(0, 99)))


def _sparse_sources(full: list[int], filters: list[int], wait: int) -> list[int | None]:
    """Per full-attention layer: the filter a sparse layer follows, else None (omnikv.algorithm.roles)."""
    out: list[int | None] = []
    current, left = None, 0
    for i in full:
        if i in filters:
            current, left = i, wait
            out.append(None)
        elif current is None or left > 0:
            left = max(left - 1, 0)
            out.append(None)
        else:
            out.append(current)
    return out


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded ids and mask (1 = real token)."""
    g = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(0, 256, (case.batch, case.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(case.pads):
        ids[row, :pad] = 256  # the pad token
        mask[row, :pad] = 0
    return ids, mask


def run(model, case: Case, cache) -> torch.Tensor:
    """(steps, B, V) logits of greedy generation through `cache`."""
    ids, mask = inputs(case)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=256)
    return torch.stack(out.logits).float()


# derandomize: the same examples on every run (no flaky CI); few of them, the file stays < 60 s.
SETTINGS = settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=cases())
def test_cache_bookkeeping_invariants(case: Case) -> None:
    model = model_for(case.family, case.layers, case.kv_heads)
    cache = OmniKVCache(model, case.config)
    logits = run(model, case, cache)
    t, fed = case.prompt_len, case.new_tokens - 1  # the last generated token is never fed
    assert logits.shape[:2] == (case.new_tokens, case.batch) and torch.isfinite(logits).all()
    k = case.config.resolve_budget(t)
    assert 1 <= k <= t
    assert cache.get_seq_length() == t + fed

    st_ = cache.stats()
    roles = [Role(r) for r in st_["layer_roles"]]
    assert len(roles) == case.layers
    attended = st_["attended_tokens_per_layer"]
    for i, role in enumerate(roles):
        layer = cache.layers[i]
        if role is Role.SPARSE:
            assert attended[i] == k + fed, (i, attended, k)
            # Drop-free: the bank holds every prompt row, the device every generated one.
            k_all, v_all = layer.full_kv()
            assert k_all.shape[2] == v_all.shape[2] == t + fed
            assert layer.segment.bank.length == t and layer.segment.generated == fed
        elif role in (Role.DENSE, Role.FILTER):
            assert attended[i] == t + fed and layer.get_seq_length() == t + fed
        else:  # sliding-window layers keep their window
            assert attended[i] <= t + fed

    ids, mask = inputs(case)
    valid = mask.bool()
    for f, idx in cache.selected_indices().items():
        groups = case.kv_heads if case.config.head_reduce == "per_kv_head" else 1
        assert idx.shape == (case.batch, groups, k)
        assert bool((idx[..., 1:] > idx[..., :-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < t
        for row in range(case.batch):
            real = int(valid[row].sum())
            chosen = idx[row]
            # A fractional budget is a share of each row's own prompt (select_topk_rows): the row
            # picks its own k real tokens, and its other slots are its padding (masked).
            own_k = case.config.resolve_budget(real) if isinstance(case.config.budget, float) else k
            if real >= own_k:  # padding fills only the slots past the row's own budget
                assert int(valid[row][chosen].sum(-1).min()) == min(own_k, k)
            if case.pads[row] == 0:
                forced = set(range(min(case.config.sink_tokens, t))) | set(range(max(t - case.config.recent_tokens, 0), t))
                if len(forced) <= k:
                    for g in range(chosen.shape[0]):
                        assert forced <= set(chosen[g].tolist())

    for key in ("device_kv_bytes", "host_kv_bytes", "h2d_bytes_per_step"):
        assert st_[key] >= 0
    assert st_["prompt_tokens"] == t and st_["selected_tokens"] == k and st_["seq_length"] == t + fed
    has_sparse = Role.SPARSE in roles
    assert (st_["host_kv_bytes"] > 0) == (case.config.offload and has_sparse)
    assert st_["device_kv_bytes"] > 0


@settings(SETTINGS, max_examples=10)
@given(case=cases(full_budget=True))
def test_budget_covering_the_prompt_equals_full_attention(case: Case) -> None:
    model = model_for(case.family, case.layers, case.kv_heads)
    cache = OmniKVCache(model, case.config)
    assert case.config.resolve_budget(case.prompt_len) == case.prompt_len
    ours = run(model, case, cache)
    ref = run(model, case, DynamicCache(config=model.config))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@settings(SETTINGS, max_examples=8)
@given(case=cases())
def test_prompt_rows_in_the_bank_are_full_attention_rows(case: Case) -> None:
    """Prefill is full attention everywhere, so each layer stores exactly full attention's prompt KV."""
    model = model_for(case.family, case.layers, case.kv_heads)
    ids, mask = inputs(case)
    cache, full = OmniKVCache(model, case.config), DynamicCache(config=model.config)
    with torch.inference_mode():
        for c in (cache, full):
            model(ids, attention_mask=mask, **cache_kwargs(c), use_cache=True)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, SparseLayer):
            k_rows, v_rows = layer.full_kv()
        elif hasattr(layer, "buffer"):
            k_rows, v_rows = layer.buffer.view()
        else:
            continue  # sliding-window layers are transformers' own cache
        torch.testing.assert_close(k_rows, full.layers[i].keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(v_rows, full.layers[i].values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("refresh", [1, 2, 3])
def test_refresh_interval_reselects_on_schedule(refresh: int) -> None:
    """refresh_every=N: the filter re-selects at decode steps 0, N, 2N, ... and only then."""
    model = model_for("llama", 4, 2)
    cfg = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=6, sink_tokens=1, recent_tokens=1, refresh_every=refresh)
    cache = OmniKVCache(model, cfg)
    steps: list[int] = []
    orig = cache.segments[1].load

    def spy(idx, step):
        steps.append(step)
        return orig(idx, step)

    cache.segments[1].load = spy
    case = Case("llama", 4, 2, cfg, 1, 30, [0], 8, 0)
    run(model, case, cache)
    # 7 decode forwards, numbered 1..7 (0 is the prefill, which attends to everything).
    assert steps == list(range(1, 8, refresh))
