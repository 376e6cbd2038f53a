"""Prefix reuse in `omnikv serve` (issue #30), on a tiny random checkpoint through HTTP.

The reference for every answer is the same request to a server without a prefix store: reuse
must change how much is prefilled (`usage.prompt_tokens_details.cached_tokens`, /metrics), never
what is answered.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from omnikv.config import OmniKVConfig
from omnikv.methods import get_method
from omnikv.models import load_model
from omnikv.models.tiny import make_tiny_checkpoint
from omnikv.server import Engine, ServerThread, create_app

DOCUMENT = "".join(f"Record {i}: item {i * 7 % 13} is in box {i * 5 % 11}. " for i in range(12))
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", family="llama")))


def method_of(name: str):
    sparse = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=16, sink_tokens=2, recent_tokens=4)
    return get_method("omnikv", config=sparse) if name == "omnikv" else get_method(name)


@pytest.fixture(scope="module", params=["full", "omnikv"])
def pair(request: pytest.FixtureRequest, tiny) -> Iterator[tuple[httpx.Client, httpx.Client, Engine]]:
    """(client of a server with a prefix store, client of one without, the store's engine)."""
    reuse = Engine.from_loaded(tiny, method_of(request.param), prefix_cache_bytes=1 << 30, prefill_chunk_size=64)
    plain = Engine.from_loaded(tiny, method_of(request.param), prefill_chunk_size=64)
    with ServerThread(create_app(reuse, max_queue=8, max_body_bytes=1 << 16)) as a, ServerThread(create_app(plain, max_queue=8)) as b:
        with httpx.Client(base_url=a.url, timeout=TIMEOUT) as ca, httpx.Client(base_url=b.url, timeout=TIMEOUT) as cb:
            yield ca, cb, reuse


def chat(client: httpx.Client, messages: list[dict], **extra) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_a_conversation_reuses_its_earlier_turns(pair) -> None:
    reuse, plain, engine = pair
    messages = [{"role": "user", "content": f"Document:\n{DOCUMENT}\n\nQuestion: where is item 3?"}]
    cached = []
    for question in ("Which box holds item 5?", "And item 9?", None):
        got, want = chat(reuse, messages), chat(plain, messages)
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
        assert want["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached.append(got["usage"]["prompt_tokens_details"]["cached_tokens"])
        if question is not None:
            messages += [got["choices"][0]["message"], {"role": "user", "content": question}]
    assert cached[0] == 0 and all(c > len(DOCUMENT) // 4 for c in cached[1:])  # byte tokens: the document at least
    st = engine.prefix_cache.stats()
    assert metric(reuse, "omnikv_prefix_cache_hits_total") == st.hits == 2
    assert metric(reuse, "omnikv_prefix_cache_misses_total") == st.misses == 1
    assert metric(reuse, 'omnikv_prefix_cache_bytes{memory="host"}') == st.host_bytes > 0
    assert metric(reuse, "omnikv_prompt_tokens_cached_total") == sum(cached)
    # Streamed usage reports the reuse too; completions as well as chat.
    r = reuse.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    last = [line for line in r.text.splitlines() if line.startswith("data: {")][-1]
    assert '"cached_tokens": ' in last and '"cached_tokens": 0' not in last
    ids = engine.encode_prompt(DOCUMENT)
    first = reuse.post("/v1/completions", json={"prompt": ids + [65, 66], "max_tokens": 2, "temperature": 0}).json()
    again = reuse.post("/v1/completions", json={"prompt": ids + [67, 68], "max_tokens": 2, "temperature": 0}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(ids) - 1 > 0
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < again["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_concurrent_conversations_sharing_a_document_get_their_own_answers(pair) -> None:
    reuse, plain, _ = pair
    convs = [[{"role": "user", "content": f"Document:\n{DOCUMENT}\n\nQuestion: where is item {k}?"}] for k in (1, 2, 4, 6)]
    expected = [chat(plain, m)["choices"][0]["message"]["content"] for m in convs]
    with ThreadPoolExecutor(4) as pool:  # all four in flight at once, twice over
        for _ in range(2):
            got = list(pool.map(lambda m: chat(reuse, m)["choices"][0]["message"]["content"], convs))
            assert got == expected


def test_refused_requests_leave_the_store_intact(pair) -> None:
    reuse, _, engine = pair
    chat(reuse, [{"role": "user", "content": f"Document:\n{DOCUMENT}\n\nQuestion: where is item 7?"}])
    store = engine.prefix_cache
    before, stats = store.entries(), store.stats()
    bad = [
        b'{"messages": [',  # malformed JSON
        b'{"messages": [{"role": "user", "content": "' + DOCUMENT.encode() + b'"}], "max_tokens": 0}',
        b'{"messages": [{"role": "user", "content": "' + DOCUMENT.encode() * 60 + b'"}]}',  # body over the limit
    ]
    for body in bad:
        r = reuse.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413), r.text
    long_prompt = {"prompt": engine.encode_prompt(DOCUMENT) * 40, "max_tokens": 2}  # longer than the model's context
    r = reuse.post("/v1/completions", json=long_prompt)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert store.entries() == before and store.stats() == stats
