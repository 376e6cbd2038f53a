"""Prefill once, decode many (omnikv.decoding.fork): every method forked from one shared prefill must decode
the same greedy tokens as its own separate run, with teacher-forced logits within LOGITS_ATOL.

Tolerance: a fork is the method's prefill in two chunks (prefix, tail) instead of one pass, so the
prefix's attention runs over fewer (masked-out anyway) keys; float32 sums then differ in rounding
only, ~1e-6 on these tiny models. 1e-4 leaves room for that and nothing else: a wrong prefix (a
missing row, a wrong position, a lost H2O score) moves logits by > 1e-2 here.
"""

from __future__ import annotations


import pytest
import torch

from omnikv.errors import InputError
from omnikv.decoding.fork import SharedPrefill, plan_shared_prefill, prefill_needs
from omnikv.decoding.generation import SamplingParams, generate, teacher_forced_logits
from omnikv.methods import get_method
from omnikv.models.tiny import build_tokenizer
from _tiny import cached_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS_ATOL = 1e-4
PROMPT = 120
NEW = 8
OMNI = {"filter_layers": (1,), "num_wait_layers": 0}  # tiny models: layer 1 filters (gemma3: 1, 3, 5 full)
SPECS = [
    ("full", {}),
    ("full_prealloc", {}),
    ("omnikv", {**OMNI, "budget": 24, "sink_tokens": 2, "recent_tokens": 4}),
    ("omnikv", {**OMNI, "budget": 24, "sink_tokens": 2, "recent_tokens": 4, "selector": "uniform", "window_size": 8}),
    ("omnikv", {**OMNI, "budget": 0.2, "sink_tokens": 2, "recent_tokens": 4, "selector": "union", "window_size": 8}),
    ("snapkv", {"budget": 24, "window_size": 8}),
    ("h2o", {"budget": 24}),
    ("streaming_llm", {"budget": 24}),
    ("quest", {"budget": 24, "page_size": 8}),
    ("infllm", {"budget": 24, "block_size": 4, "repr_window": 16}),
    ("tidaldecode", {"budget": 24}),
]


def model_of(family: str):
    return cached_tiny_model(family)


def prompt(n: int = PROMPT, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def label(spec) -> str:
    name, opts = spec
    return name + "".join(f":{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("tail", [8, None])
@pytest.mark.parametrize("spec", SPECS, ids=label)
def test_fork_decodes_as_the_methods_own_prefill(family, tail, spec):
    model, tok = model_of(family), build_tokenizer()
    ids = prompt()
    method = get_method(spec[0], **spec[1])
    need, queries = prefill_needs(method, model)
    shared = SharedPrefill.run(model, ids, tail=max(need, tail or 64), record_queries=queries)
    assert 0 < shared.split < len(ids) and len(shared.tail) == len(ids) - shared.split
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    alone = generate(model, tok, ids, get_method(spec[0], **spec[1]), params)
    forked = generate(model, tok, ids, get_method(spec[0], **spec[1]), params, shared=shared)
    assert forked.token_ids == alone.token_ids
    assert forked.prompt_tokens == alone.prompt_tokens == len(ids)
    ref = alone.token_ids
    a = teacher_forced_logits(model, ids, ref, get_method(spec[0], **spec[1]))
    b = teacher_forced_logits(model, ids, ref, get_method(spec[0], **spec[1]), shared=shared)
    assert a.shape == b.shape == (NEW, model.config.vocab_size)
    torch.testing.assert_close(b, a, atol=LOGITS_ATOL, rtol=0)


def test_one_shared_prefill_serves_every_method_in_turn():
    """The runner's use: one prefill, every method forked from it; the forks do not disturb it."""
    model, tok = model_of("gemma3_text"), build_tokenizer()
    ids = prompt(seed=3)
    methods = [get_method(n, **o) for n, o in SPECS]
    tail, queries, alone = plan_shared_prefill(methods, model)
    assert alone == set() and queries  # h2o needs the prefix queries
    shared = SharedPrefill.run(model, ids, tail=tail, record_queries=queries)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    for (name, opts), method in zip(SPECS, methods):
        forked = generate(model, tok, ids, method, params, shared=shared)
        own = generate(model, tok, ids, get_method(name, **opts), params)
        assert forked.token_ids == own.token_ids, (name, opts)
    assert shared.forks == len(SPECS)


def test_h2o_fork_without_recorded_queries_is_refused():
    model = model_of("llama")
    shared = SharedPrefill.run(model, prompt(), tail=8)
    with pytest.raises(InputError, match="record_queries"):
        shared.cache_for(get_method("h2o", budget=24))


def test_shared_prefill_of_another_prompt_is_refused():
    model, tok = model_of("llama"), build_tokenizer()
    shared = SharedPrefill.run(model, prompt(), tail=8)
    with pytest.raises(InputError, match="another prompt"):
        generate(model, tok, prompt(seed=1), "full", SamplingParams(max_new_tokens=2), shared=shared)


def test_tail_covers_every_observation_window():
    model = model_of("llama")
    assert prefill_needs(get_method("full"), model) == (1, False)
    assert prefill_needs(get_method("snapkv", budget=24, window_size=40), model) == (40, False)
    assert prefill_needs(get_method("omnikv", **OMNI, budget=24, recent_tokens=4, selector="exp", window_size=12), model) == (12, False)
    assert prefill_needs(get_method("h2o", budget=24), model) == (1, True)
    assert prefill_needs(get_method("infllm", budget=24), model) == (1, True)
    assert prefill_needs(get_method("tidaldecode", budget=24), model) == (1, False)
    tail, queries, _ = plan_shared_prefill([get_method("snapkv", budget=24, window_size=100)], model)
    assert tail == 100 and not queries
