"""Prefix reuse across requests (omnikv.decoding.prefix_cache) and Session continuation.

The reference is always the method's own run on the whole prompt with a fresh cache (`generate`):
a request served from the store must decode the same greedy tokens, with next-token logits within
LOGITS_ATOL (a reused request is the method's prefill in chunks: float rounding only, as in
tests/test_fork.py). The store's invariants (byte bound, LRU order, entries never written, nothing
stored by an aborted request) are checked directly.
"""

from __future__ import annotations

import functools

import pytest
import torch

from omnikv.decoding.generation import SamplingParams, Session, generate, prefill_chunks
from omnikv.decoding.prefix_cache import PrefixCache
from omnikv.errors import ConfigError
from omnikv.methods import get_method
from omnikv.models.tiny import build_tokenizer, tiny_model

LOGITS_ATOL = 1e-4
NEW = 6
OMNI = {"filter_layers": (1,), "num_wait_layers": 0}
SPECS = [
    ("full", {}),
    ("full_prealloc", {}),
    ("omnikv", {**OMNI, "budget": 24, "sink_tokens": 2, "recent_tokens": 4}),
    ("omnikv", {**OMNI, "budget": 0.2, "sink_tokens": 2, "recent_tokens": 4, "selector": "union", "window_size": 8}),
    ("snapkv", {"budget": 24, "window_size": 8}),
    ("h2o", {"budget": 24}),
    ("streaming_llm", {"budget": 24}),
    ("quest", {"budget": 24, "page_size": 8}),
]
PARAMS = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


@functools.lru_cache(maxsize=None)
def model_of(family: str):
    return tiny_model(family)


def tokens(n: int, seed: int) -> list[int]:
    """n random byte tokens, the same for a given seed."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def label(spec) -> str:
    name, opts = spec
    return name + "".join(f":{k}={v}" for k, v in opts.items())


def served(store: PrefixCache, tok, ids: list[int]) -> tuple[list[int], torch.Tensor, int]:
    """(greedy tokens, first next-token logits, reused tokens) of one request through the store."""
    session, reused = store.session(tok, ids)
    session.reserve(NEW)
    logits = session.feed()
    return session.decode(logits.clone(), PARAMS).token_ids, logits, reused


def fresh(model, tok, method, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    session = Session(model, tok, method)
    session.append(ids)
    session.reserve(NEW)
    logits = session.feed()
    return session.decode(logits.clone(), PARAMS).token_ids, logits


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("spec", SPECS, ids=label)
def test_reused_requests_decode_as_fresh_ones(family, spec):
    """A document, two questions, a follow-up and a repeat: every request equals a fresh run."""
    model, tok = model_of(family), build_tokenizer()
    doc, qa, qb, answer = tokens(140, 0), tokens(20, 1), tokens(25, 2), tokens(6, 3)
    store = PrefixCache(model, get_method(spec[0], **spec[1]), max_bytes=1 << 30)
    prompts = [doc + qa, doc + qb, doc + qa + answer + qb, doc + qb]
    reused = []
    for ids in prompts:
        got, logits, n = served(store, tok, ids)
        want, ref = fresh(model, tok, get_method(spec[0], **spec[1]), ids)
        assert got == want
        torch.testing.assert_close(logits, ref, atol=LOGITS_ATOL, rtol=0)
        reused.append(n)
    tail = store.tail
    assert tail >= 2
    # The document is shared by both questions; the follow-up reuses the whole first request.
    assert reused == [0, len(doc), len(doc + qa) - tail, len(doc + qb) - tail]
    st = store.stats()
    assert (st.hits, st.misses, st.cached_tokens) == (3, 1, sum(reused))


def test_interleaved_conversations_sharing_a_document_stay_independent():
    """Two conversations about one document, turns interleaved, against each alone; the stored
    tensors are never written (checksums unchanged while other requests reuse them)."""
    model, tok = model_of("llama"), build_tokenizer()
    method = get_method("omnikv", **SPECS[2][1])
    doc = tokens(150, 4)
    turns = {"a": [tokens(12, 5), tokens(9, 6)], "b": [tokens(15, 7), tokens(11, 8)]}
    store = PrefixCache(model, method, max_bytes=1 << 30)
    history = {"a": list(doc), "b": list(doc)}
    sums: dict[int, float] = {}
    for step in range(2):
        for who in ("a", "b"):
            history[who] += turns[who][step]
            got, _, _ = served(store, tok, history[who])
            assert got == fresh(model, tok, method, history[who])[0], (who, step)
            history[who] += got
            # Entries seen before must be unchanged. Keyed by the store's own entry key, never
            # id(): an entry a longer one replaced is freed and its id() can be reused.
            for entry in store._entries.values():
                total = float(sum(t.double().sum() for t in entry.prefill.tensors()))
                assert sums.setdefault(entry.key, total) == total
    assert store.stats().hits == 3  # b's first turn reused a's document


def test_store_never_exceeds_its_bound_and_evicts_least_recently_used():
    model, tok = model_of("llama"), build_tokenizer()
    probe = PrefixCache(model, "full", max_bytes=1 << 30)
    served(probe, tok, tokens(60, 10))
    per_entry = probe.bytes  # one 60-token prompt's prefill
    store = PrefixCache(model, "full", max_bytes=int(per_entry * 2.5))
    prompts = [tokens(60, 20 + i) for i in range(5)]
    for i, ids in enumerate(prompts):
        served(store, tok, ids)
        if i == 1:
            served(store, tok, prompts[0] + [1, 2, 3])  # touch prompt 0: now the most recent
        assert store.bytes <= store.max_bytes
    st = store.stats()
    assert st.entries == 2 and st.evictions >= 3 and st.bytes <= st.max_bytes
    held = [ids for ids, _ in store.entries()]
    assert [p[: len(ids)] == ids for p, ids in zip(prompts[3:], held)] == [True, True]


def test_an_entry_larger_than_the_bound_is_not_kept_and_changes_nothing():
    model, tok = model_of("llama"), build_tokenizer()
    store = PrefixCache(model, "full", max_bytes=1 << 30)
    served(store, tok, tokens(40, 30))
    before = store.entries()
    store.max_bytes = before[0][1] + 1  # room for what it holds, not for a 4x longer prompt
    served(store, tok, tokens(160, 31))
    assert store.entries() == before and store.bytes <= store.max_bytes


def test_an_aborted_prefill_leaves_the_store_as_it_was():
    model, tok = model_of("llama"), build_tokenizer()
    store = PrefixCache(model, "full", max_bytes=1 << 30, prefill_chunk_size=16)
    doc = tokens(120, 40)
    served(store, tok, doc + [7, 8, 9])
    before, stats = store.entries(), store.stats()
    calls = []

    def leave() -> None:  # the client went away after two chunks
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("client gone")

    with pytest.raises(RuntimeError, match="client gone"):
        store.session(tok, doc[:50] + tokens(100, 41), on_chunk=leave)
    assert store.entries() == before and store.stats() == stats
    assert served(store, tok, doc + [7, 8, 9, 10])[2] > 0  # still serves its entry


def test_salted_requests_share_nothing_with_other_salts():
    model, tok = model_of("llama"), build_tokenizer()
    store = PrefixCache(model, "full", max_bytes=1 << 30)
    doc = tokens(80, 50)
    assert store.session(tok, doc + [1, 2], salt="alice")[1] == 0
    assert store.session(tok, doc + [3, 4], salt="bob")[1] == 0
    assert store.session(tok, doc + [5, 6])[1] == 0
    assert store.session(tok, doc + [7, 8], salt="alice")[1] == len(doc)


def test_zero_bytes_or_a_bad_bound():
    model, tok = model_of("llama"), build_tokenizer()
    store = PrefixCache(model, "full", max_bytes=0)
    assert not store.enabled
    for _ in range(2):
        assert served(store, tok, tokens(50, 60))[2] == 0
    assert store.stats().entries == 0
    with pytest.raises(ConfigError, match="max_bytes"):
        PrefixCache(model, "full", max_bytes=-1)


def test_prefill_chunks_never_end_with_a_single_token():
    assert prefill_chunks(10, None) == [(0, 10)]
    assert prefill_chunks(9, 4) == [(0, 4), (4, 9)]  # not (8, 9): one token alone is a decode step
    assert prefill_chunks(8, 4) == [(0, 4), (4, 8)]
    assert prefill_chunks(1, 4) == [(0, 1)]
    for n in range(1, 40):
        for c in range(1, 9):
            b = prefill_chunks(n, c)
            assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
            assert len(b) == 1 or b[-1][1] - b[-1][0] >= 2


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=label)
def test_a_chunked_prefill_with_a_one_token_remainder_equals_one_pass(spec):
    model, tok = model_of("llama"), build_tokenizer()
    ids = tokens(33, 70)  # 4 chunks of 8 and one token
    one = generate(model, tok, ids, get_method(spec[0], **spec[1]), PARAMS)
    chunked = generate(model, tok, ids, get_method(spec[0], **spec[1]), PARAMS, prefill_chunk_size=8)
    assert chunked.token_ids == one.token_ids


def test_a_session_continues_after_generate():
    """Turn 2 appended to the session equals a fresh run of the whole conversation (full
    attention: the cache holds exactly prompt + answer); a stop string's last token stays."""
    model, tok = model_of("llama"), build_tokenizer()
    session = Session(model, tok, "full")
    session.append(tokens(60, 80))
    first = session.generate(SamplingParams(max_new_tokens=5))
    assert session.tokens[60:] == first.token_ids  # every generated token, in the cache or queued
    session.append(tokens(7, 81))
    second = session.generate(PARAMS)
    whole = generate(model, tok, tokens(60, 80) + first.token_ids + tokens(7, 81), "full", PARAMS)
    assert second.token_ids == whole.token_ids
    # A stop string: the token that completed it is part of the conversation too.
    text = tok.decode(second.token_ids[:3])
    stopper = Session(model, tok, "full")
    stopper.append(tokens(60, 80) + first.token_ids + tokens(7, 81))
    res = stopper.generate(SamplingParams(max_new_tokens=NEW, ignore_eos=True, stop=(text[-1],)))
    assert res.finish_reason == "stop" and stopper.tokens[-len(res.token_ids):] == res.token_ids
