"""HTTP tests of `omnikv serve`'s app with a fake engine: real uvicorn on a loopback port.

The fake engine is byte-level (one token per UTF-8 byte) and writes a known character sequence, so
every answer, token count and finish reason below is computed from the request, not recorded.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import httpx
import openai
import pytest

from omnikv.server import ChatMessage, EngineResult, GenRequest, ServerThread, create_app

MODEL = "fake-model"
CONTEXT = 128
GREEDY_SEQ = "xyz "  # the fake's greedy output repeats this
SAMPLED_ALPHABET = "abcdefgh "
TIMEOUT = httpx.Timeout(20.0)


class FakeEngine:
    """Deterministic `EngineLike`. Prompt markers: CRASH raises, EOS ends after 3 tokens."""

    name = MODEL

    def __init__(self, max_context: int | None = CONTEXT, delay: float = 0.0) -> None:
        self.max_context = max_context
        self.delay = delay  # seconds per token
        self.gate = threading.Event()  # generation waits for it (at most 20 s); set = open
        self.gate.set()
        self.started: list[str] = []  # prompts in the order the engine began them
        self.aborted = 0  # generations stopped by an exception from on_token
        self.lock = threading.Lock()

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(prompt.encode())

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        return list(chat_text(messages).encode())

    def generate(self, req: GenRequest, on_token: Callable[[str], None]) -> EngineResult:
        prompt = bytes(req.prompt_ids).decode(errors="replace")
        with self.lock:
            self.started.append(prompt)
        self.gate.wait(20)
        if "CRASH" in prompt:
            raise RuntimeError("engine failure")
        rng = random.Random(req.seed) if req.temperature > 0 else None
        out, finish = "", "length"
        try:
            for i in range(req.max_tokens):
                if "EOS" in prompt and i == 3:
                    finish = "stop"
                    break
                ch = GREEDY_SEQ[i % 4] if rng is None else rng.choice(SAMPLED_ALPHABET)
                if self.delay:
                    time.sleep(self.delay)
                on_token(ch)
                out += ch
                if any(s in out for s in req.stop):
                    finish = "stop"
                    break
        except Exception:
            with self.lock:
                self.aborted += 1
            raise
        return EngineResult(out, len(req.prompt_ids), len(out), finish, {"device_kv_bytes": 10 * len(req.prompt_ids), "host_kv_bytes": 7})


class BatchingFakeEngine(FakeEngine):
    """The fake with `generate_batch`: rows run one after another, and the batches are recorded."""

    max_batch_size = 3

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.batches: list[list[str]] = []

    def batch_key(self, req: GenRequest):
        return None if req.seed is not None else (req.temperature, req.top_p)

    def generate_batch(self, reqs: list[GenRequest], on_tokens: list[Callable[[str], None]]) -> list[EngineResult | BaseException]:
        self.batches.append([bytes(r.prompt_ids).decode() for r in reqs])
        out: list[EngineResult | BaseException] = []
        for r, cb in zip(reqs, on_tokens):
            try:
                out.append(self.generate(r, cb))
            except Exception as exc:
                out.append(exc)
        return out


def chat_text(messages: list[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def greedy(n: int) -> str:
    return "".join(GREEDY_SEQ[i % 4] for i in range(n))


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, FakeEngine]]:
    engine = FakeEngine()
    app = create_app(engine, max_queue=8, max_body_bytes=4096, max_prompt_tokens=100, max_tokens_limit=64)
    with ServerThread(app) as srv:
        yield srv, engine


@pytest.fixture
def client(server: tuple[ServerThread, FakeEngine]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0].url, timeout=TIMEOUT) as c:
        yield c


def sse_events(text: str) -> list[dict | str]:
    out: list[dict | str] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- happy paths ---------------------------------------------------------------------------------


def test_completion_greedy_usage_and_length(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == greedy(7)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == usage(5, 7)


def test_chat_eos_finish_reason_stop(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "EOS"}], "max_tokens": 20, "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": greedy(3)}
    assert choice["finish_reason"] == "stop"
    expected_prompt = len(chat_text([ChatMessage("user", "EOS")]).encode())
    assert r.json()["usage"]["prompt_tokens"] == expected_prompt


def test_stop_string_excluded_and_ends_generation(client: httpx.Client) -> None:
    # greedy text is "xyz xyz ..."; "z x" first ends at index 4, so the answer is "xy".
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 20, "temperature": 0, "stop": ["z x", "nope"], "stream": stream})
        if stream:
            events = sse_events(r.text)
            text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))
            finish = [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict)][-1]
        else:
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert text == "xy"
        assert finish == "stop"


def test_many_stop_strings_as_lm_eval_sends_them(client: httpx.Client) -> None:
    stops = ["q1", "q2", "q3", "q4", "q5", "<|im_end|>", "z "]  # a task's `until` + the EOS string
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 20, "temperature": 0, "stop": stops})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "xy" and r.json()["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_deterministic(client: httpx.Client) -> None:
    def run(seed: int) -> str:
        r = client.post("/v1/completions", json={"prompt": "s", "max_tokens": 30, "temperature": 1.0, "seed": seed})
        return r.json()["choices"][0]["text"]

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c  # 9^30 possible strings: two seeds colliding would be a plumbing bug
    rng = random.Random(1)
    assert a == "".join(rng.choice(SAMPLED_ALPHABET) for _ in range(30))


def test_stream_chat_chunks_and_usage(client: httpx.Client) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == greedy(6)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    prompt_tokens = len(chat_text([ChatMessage("user", "hi")]).encode())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage(prompt_tokens, 6)
    assert len({c["id"] for c in chunks}) == 1


def test_token_id_prompt_and_default_max_tokens_capped_by_context(client: httpx.Client) -> None:
    ids = list(b"abc" * 40)  # 120 tokens > max_prompt_tokens=100
    r = client.post("/v1/completions", json={"prompt": ids})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    ids = list(b"a" * 100)  # chat's default max_tokens 256 is capped to CONTEXT - 100 = 28
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 83}], "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"] == usage(100, CONTEXT - 100)
    r = client.post("/v1/completions", json={"prompt": ids, "temperature": 0})  # completions: 16, as OpenAI
    assert r.status_code == 200 and r.json()["usage"] == usage(100, 16)


def test_models_health_metrics(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    before = _metric(client.get("/metrics").text, "omnikv_completion_tokens_total")
    client.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 5, "temperature": 0})
    text = client.get("/metrics").text
    assert _metric(text, "omnikv_completion_tokens_total") == before + 5
    assert _metric(text, "omnikv_kv_device_bytes") == 40  # the fake reports 10 bytes per prompt token
    assert _metric(text, "omnikv_kv_host_bytes") == 7
    assert _metric(text, "omnikv_queue_length") == 0
    assert _metric(text, 'omnikv_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert "omnikv_request_latency_seconds_bucket" in text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name) and "{" in name and line.split(" ")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not in output")


# -- official openai client ----------------------------------------------------------------------


def test_openai_client_chat_and_completion(server: tuple[ServerThread, FakeEngine]) -> None:
    oai = openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=20)
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == greedy(5)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    pieces = []
    for chunk in oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == greedy(9)
    comp = oai.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0)
    assert comp.choices[0].text == greedy(4) and comp.usage.prompt_tokens == 3
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == greedy(4)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model=MODEL, prompt="abc", max_tokens=10_000)


# -- hostile requests ----------------------------------------------------------------------------

CHAT_OK = {"messages": [{"role": "user", "content": "hi"}]}

BAD_REQUESTS = [
    # (path, raw body, status, param or None, text the message must contain)
    ("/v1/chat/completions", b'{"messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", b"{}", 400, "messages", "Missing required parameter"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages", "at least 1"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "messages", "valid array"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages[0].role", "role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content", ""),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "max_tokens": "5"}).encode(), 400, "max_tokens", "integer"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "max_tokens": 0}).encode(), 400, "max_tokens", "between 1 and 64"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "max_tokens": 65}).encode(), 400, "max_tokens", "between 1 and 64"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "max_tokens": -3}).encode(), 400, "max_tokens", "between 1 and 64"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "temperature": 3}).encode(), 400, "temperature", "less than or equal to 2"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "temperature": "hot"}).encode(), 400, "temperature", "number"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "top_p": 1.5}).encode(), 400, "top_p", ""),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "stream": "yes"}).encode(), 400, "stream", "boolean"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "seed": 1.5}).encode(), 400, "seed", "integer"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "seed": 2**64}).encode(), 400, "seed", "less than or equal"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "stop": [str(i) for i in range(65)]}).encode(), 400, "stop", "at most 64"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "stop": ["x" * 513]}).encode(), 400, "stop", "at most 512 characters"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "finite number"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p", "finite number"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "continue_final_message": True}).encode(), 400, "continue_final_message", "add_generation_prompt: false"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "chat_template_kwargs": {"tokenize": True}}).encode(), 400, "chat_template_kwargs", "'tokenize'"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "chat_template": "{{ x }}"}).encode(), 400, "chat_template", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "spaces_between_special_tokens": False}).encode(), 400, "spaces_between_special_tokens", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "priority": 5}).encode(), 400, "priority", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "stop": [""]}).encode(), 400, "stop", "non-empty"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "n": 17}).encode(), 400, "n", "less than or equal to 16"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "n": 0}).encode(), 400, "n", "greater than or equal to 1"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "logit_bias": {"5": 10}}).encode(), 400, "logit_bias", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), 400, "tools", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "response_format": {"type": "json_object"}}).encode(), 400, "response_format", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "tool_choice": "auto"}).encode(), 400, "tool_choice", "not supported"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "top_logprobs": 3}).encode(), 400, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "logprobs": True, "top_logprobs": 21}).encode(), 400, "top_logprobs", "less than or equal to 20"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "min_tokens": 9, "max_tokens": 3}).encode(), 400, "min_tokens", "must not exceed"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "repetition_penalty": 0}).encode(), 400, "repetition_penalty", "greater than 0"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "min_p": 1.5}).encode(), 400, "min_p", ""),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": None}]}).encode(), 400, "messages[0]", "needs content"),
    ("/v1/chat/completions", json.dumps({**CHAT_OK, "model": "gpt-4"}).encode(), 404, "model", "does not exist"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 200}]}).encode(), 400, None, "at most 100"),
    ("/v1/completions", json.dumps({"prompt": ["a"] * 65}).encode(), 400, "prompt", "at most 64 prompts"),
    ("/v1/completions", json.dumps({"prompt": [[1], []]}).encode(), 400, "prompt[1]", "must not be empty"),
    ("/v1/completions", json.dumps({"prompt": [[1, -2]]}).encode(), 400, "prompt", "token id -2"),
    ("/v1/completions", json.dumps({"prompt": "a", "echo": True, "stream": True}).encode(), 400, "echo", "stream"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens", "between 1 and 64"),
    ("/v1/completions", json.dumps({"prompt": "a", "best_of": 3}).encode(), 400, "best_of", "must equal n"),
    ("/v1/completions", json.dumps({"prompt": "a", "stop_token_ids": [3]}).encode(), 400, "stop_token_ids", "not supported"),
    ("/v1/completions", json.dumps({"prompt": "a" * 90, "max_tokens": 60}).encode(), 400, "max_tokens", "maximum context length is 128"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), 400, "prompt", "empty"),
    ("/v1/completions", json.dumps({"prompt": "a" * 5000}).encode(), 413, None, "4096 bytes"),
]


@pytest.mark.parametrize("path,body,status,param,needle", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(client: httpx.Client, path: str, body: bytes, status: int, param: str | None, needle: str) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]
    assert err["param"] == param


def test_chunked_body_over_limit_is_413(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_context_limit_from_model_without_prompt_limit() -> None:
    engine = FakeEngine(max_context=16)
    with ServerThread(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/completions", json={"prompt": "a" * 16})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert c.post("/v1/completions", json={"prompt": "a" * 15, "max_tokens": 1}).status_code == 200


def test_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/v1/embeddings", json={})
    assert r.status_code == 404 and "error" in r.json()


def test_engine_failure_is_500_and_server_keeps_serving(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "CRASH", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "engine failure" not in r.text  # internals stay in the log
    r = client.post("/v1/completions", json={"prompt": "CRASH", "max_tokens": 3, "stream": True})
    assert r.status_code == 500  # failed before the first token: still a plain error response
    r = client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(3)


# -- auth ----------------------------------------------------------------------------------------


def test_api_key_required_when_configured() -> None:
    with ServerThread(create_app(FakeEngine(), api_key="s3cret")) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        assert c.get("/health").status_code == 200  # liveness probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/tokenizer_info").status_code == 401
        assert c.get("/version").status_code == 200
        # The key is checked before the body is read: an oversized body without it gets 401, not 413.
        r = c.post("/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 401
        ok = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=20)
        assert good.models.list().data[0].id == MODEL
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0, timeout=20)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# -- queueing, disconnects, load -----------------------------------------------------------------


def test_fifo_order_and_queue_full_is_immediate_429() -> None:
    engine = FakeEngine()
    app = create_app(engine, max_queue=2)
    engine.gate.clear()  # the first request blocks the engine until the gate opens
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(3) as pool:
        sched = app.state.scheduler
        futures = []
        for i, prompt in enumerate(("first", "second", "third")):
            futures.append(pool.submit(c.post, "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}))
            # wait until it is running (i=0) or queued, so arrival order is certain
            wait_until(lambda: sched.running + sched.waiting == i + 1)
        t0 = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "fourth", "max_tokens": 2})
        assert r.status_code == 429 and time.monotonic() - t0 < 2.0
        assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert c.get("/health").json()["queue_length"] == 2
        engine.gate.set()
        assert [f.result(timeout=20).status_code for f in futures] == [200, 200, 200]
    assert engine.started == ["first", "second", "third"]


def test_client_disconnect_frees_slot() -> None:
    engine = FakeEngine(max_context=None, delay=0.01)
    app = create_app(engine, max_queue=1)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        sched = app.state.scheduler
        # a stream read for a moment, then closed: the generation (500 tokens, ~5 s) must stop early
        with c.stream("POST", "/v1/completions", json={"prompt": "long", "max_tokens": 500, "stream": True, "temperature": 0}) as r:
            next(r.iter_bytes())
        wait_until(lambda: engine.aborted == 1 and sched.running == 0, timeout=4.0)
        # a non-streaming request whose client gives up (timeout) is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "long", "max_tokens": 500, "temperature": 0}, timeout=0.5)
        wait_until(lambda: engine.aborted == 2 and sched.running == 0, timeout=4.0)
        # a queued request whose client leaves is removed from the queue without running
        engine.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(c.post, "/v1/completions", json={"prompt": "blocker", "max_tokens": 1})
            wait_until(lambda: sched.running == 1)
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={"prompt": "leaver", "max_tokens": 1}, timeout=0.5)
            wait_until(lambda: sched.waiting == 0, timeout=4.0)
            engine.gate.set()
            assert blocker.result(timeout=20).status_code == 200
        assert "leaver" not in engine.started
        assert c.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200


def test_concurrent_load_complete_or_clean_refusal() -> None:
    engine = FakeEngine(delay=0.001)
    app = create_app(engine, max_queue=4)
    n_clients, per_client = 10, 5

    def client_run(k: int) -> list[tuple[int, bool]]:
        results = []
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            for j in range(per_client):
                n = 3 + (k + j) % 5
                stream = (k + j) % 2 == 0
                r = c.post("/v1/completions", json={"prompt": f"c{k}r{j}", "max_tokens": n, "temperature": 0, "stream": stream})
                if r.status_code == 200:
                    if stream:
                        events = sse_events(r.text)
                        text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))
                        complete = events[-1] == "[DONE]" and text == greedy(n)
                    else:
                        body = r.json()
                        complete = body["choices"][0]["text"] == greedy(n) and body["usage"]["completion_tokens"] == n
                else:
                    complete = r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                results.append((r.status_code, complete))
        return results

    with ServerThread(app) as srv:
        with ThreadPoolExecutor(n_clients) as pool:
            all_results = [x for f in [pool.submit(client_run, k) for k in range(n_clients)] for x in f.result(timeout=60)]
        assert len(all_results) == n_clients * per_client
        assert all(ok for _, ok in all_results), all_results
        assert any(code == 200 for code, _ in all_results)
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            assert c.get("/health").json() == {"status": "ok", "model": MODEL, "queue_length": 0, "running": 0}
            served = sum(code == 200 for code, _ in all_results)
            assert _metric(c.get("/metrics").text, 'omnikv_requests_total{endpoint="/v1/completions",status="200"}') == served


def test_batches_follow_arrival_order_and_sampling_settings() -> None:
    engine = BatchingFakeEngine()
    app = create_app(engine, max_queue=8)
    engine.gate.clear()
    greedy_req = {"max_tokens": 3, "temperature": 0}
    plan = [("blocker", greedy_req), ("g1", greedy_req), ("g2", greedy_req), ("seeded", {"max_tokens": 3, "temperature": 1.0, "seed": 5}),
            ("g3", greedy_req), ("g4", greedy_req), ("g5", greedy_req), ("g6", greedy_req)]
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(len(plan)) as pool:
        sched = app.state.scheduler
        futures = []
        for i, (prompt, extra) in enumerate(plan):
            futures.append(pool.submit(c.post, "/v1/completions", json={"prompt": prompt, **extra}))
            wait_until(lambda: sched.running + sched.waiting == i + 1)
        engine.gate.set()
        bodies = [f.result(timeout=20).json() for f in futures]
    # arrival order throughout; the blocker started before the others arrived, the seeded request
    # runs alone, and greedy neighbours share batches of at most 3 (g6 is left alone)
    assert engine.started == [p for p, _ in plan]
    assert engine.batches == [["g1", "g2"], ["g3", "g4", "g5"]]
    for (prompt, extra), body in zip(plan, bodies):
        if prompt != "seeded":
            assert body["choices"][0]["text"] == greedy(3)
    rng = random.Random(5)
    assert bodies[3]["choices"][0]["text"] == "".join(rng.choice(SAMPLED_ALPHABET) for _ in range(3))


def test_disconnect_inside_a_batch_spares_the_other_rows() -> None:
    engine = BatchingFakeEngine(max_context=None, delay=0.005)
    app = create_app(engine, max_queue=8)
    engine.gate.clear()
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(3) as pool:
        sched = app.state.scheduler
        blocker = pool.submit(c.post, "/v1/completions", json={"prompt": "blocker", "max_tokens": 1})
        wait_until(lambda: sched.running == 1)
        leaver = pool.submit(c.post, "/v1/completions", json={"prompt": "leaver", "max_tokens": 4000, "temperature": 0}, timeout=2.0)
        wait_until(lambda: sched.waiting == 1)
        stayer = pool.submit(c.post, "/v1/completions", json={"prompt": "stayer", "max_tokens": 30, "temperature": 0})
        wait_until(lambda: sched.waiting == 2)
        engine.gate.set()
        with pytest.raises(httpx.ReadTimeout):
            leaver.result(timeout=20)
        assert blocker.result(timeout=20).status_code == 200
        r = stayer.result(timeout=20)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(30)
        wait_until(lambda: engine.aborted == 1 and sched.running == 0, timeout=6.0)
    assert engine.batches == [["leaver", "stayer"]]  # the leaver gave up while its batch ran
