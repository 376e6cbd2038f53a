"""Defects from a hostile-input review of `omnikv serve`, each pinned by a test (fake engine, real
uvicorn on loopback): CSRF / DNS rebinding, oversized prompts, shutdown, slow clients, small ones."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import openai
import pytest

from omnikv.server import ServerThread, create_app
from tests.test_server import MODEL, TIMEOUT, FakeEngine, greedy, sse_events, wait_until


class CountingEngine(FakeEngine):
    """The byte-level fake, declaring its vocabulary and recording what it tokenizes."""

    vocab_size = 256
    max_token_chars = 1  # one byte per token, so one character is at least one token

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.encoded: list[int] = []  # lengths of the texts given to encode_prompt

    def encode_prompt(self, prompt: str) -> list[int]:
        self.encoded.append(len(prompt))
        return super().encode_prompt(prompt)


@pytest.fixture(scope="module")
def srv() -> Iterator[tuple[ServerThread, CountingEngine]]:
    engine = CountingEngine()
    app = create_app(engine, max_queue=4, max_body_bytes=1 << 20, max_prompt_tokens=100, max_tokens_limit=64)
    with ServerThread(app) as s:
        yield s, engine


@pytest.fixture
def client(srv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv[0].url, timeout=TIMEOUT) as c:
        yield c


# -- features on the fake: several choices and prompts, tiny temperature ------------------------


def test_openai_client_n_and_several_prompts_on_an_engine_without_fork(srv) -> None:
    oai = openai.OpenAI(base_url=srv[0].url + "/v1", api_key="x", max_retries=0, timeout=20)
    comp = oai.completions.create(model=MODEL, prompt=["ab", "cde"], max_tokens=3, temperature=0, n=2)
    assert [c.text for c in comp.choices] == [greedy(3)] * 4 and [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.usage.prompt_tokens == 5 and comp.usage.completion_tokens == 12
    # streamed: every choice gets its own chunks and finish_reason
    chunks = list(oai.completions.create(model=MODEL, prompt=[[97, 98]], max_tokens=4, temperature=0, n=2, stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == greedy(4)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i][-1] == "length"


def test_tiny_temperature_is_greedy(client: httpx.Client) -> None:
    # 1e-40 is inside the documented range; dividing logits by it overflows: treat as greedy.
    r = client.post("/v1/completions", json={"prompt": "t", "max_tokens": 6, "temperature": 1e-40})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(6)


# -- oversized prompts are refused before tokenizing -----------------------------------------------


def test_huge_prompt_refused_by_length_before_tokenizing(srv, client: httpx.Client) -> None:
    engine = srv[1]
    engine.encoded.clear()
    r = client.post("/v1/completions", json={"prompt": "a" * 300_000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long" and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "b" * 300_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/tokenize", json={"prompt": "c" * 300_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert engine.encoded == []  # nothing was tokenized
    ok = client.post("/v1/completions", json={"prompt": "a" * 90, "max_tokens": 1})  # under the bound: tokenized
    assert ok.status_code == 200 and engine.encoded == [90]


# -- CSRF and DNS rebinding --------------------------------------------------------------------------


def test_post_needs_json_content_type(client: httpx.Client) -> None:
    body = json.dumps({"prompt": "a", "max_tokens": 1})
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", headers
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_unexpected_host_header_is_refused_and_no_cors(srv, client: httpx.Client) -> None:
    port = srv[0].port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
        r = client.get("/v1/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    pre = client.options("/v1/completions", headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_allowed_hosts_are_configurable() -> None:
    with ServerThread(create_app(FakeEngine(), allowed_hosts=["omnikv.internal"])) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        assert c.get("/health", headers={"host": "omnikv.internal:8000"}).status_code == 200
        assert c.get("/health").status_code == 400  # 127.0.0.1 was not listed
    with ServerThread(create_app(FakeEngine(), allowed_hosts=None)) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        assert c.get("/health", headers={"host": "anything"}).status_code == 200


# -- shutdown ---------------------------------------------------------------------------------------


def test_sigterm_answers_queued_with_503_json_and_ends_streams_cleanly() -> None:
    engine = FakeEngine(max_context=None, delay=0.02)
    app = create_app(engine, max_queue=4, shutdown_drain_s=0.5)
    srv = ServerThread(app, graceful_s=5.0).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c, ThreadPoolExecutor(2) as pool:
            sched = app.state.scheduler

            def stream() -> tuple[int, list]:
                with c.stream("POST", "/v1/completions", json={"prompt": "long", "max_tokens": 2000, "temperature": 0, "stream": True}) as r:
                    return r.status_code, sse_events(r.read().decode())

            running = pool.submit(stream)
            wait_until(lambda: sched.running == 1)
            queued = pool.submit(c.post, "/v1/completions", json={"prompt": "waiting", "max_tokens": 2})
            wait_until(lambda: sched.waiting == 1)
            srv.signal_exit()  # what SIGTERM does
            q = queued.result(timeout=20)
            assert q.status_code == 503 and q.json()["error"]["code"] == "shutting_down"
            assert q.headers["retry-after"] == "10"  # when to come back (a restarted server)
            status, events = running.result(timeout=20)
            assert status == 200
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
            assert any("choices" in e for e in events[:-2])  # it had streamed text before
    finally:
        srv.stop()


# -- slow clients ----------------------------------------------------------------------------------


def test_slow_headers_and_slow_body_are_cut() -> None:
    app = create_app(FakeEngine(), body_timeout_s=0.5)
    with ServerThread(app, header_timeout_s=0.5) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            assert sock.recv(1024) == b""  # the server closed the connection (a timeout raises instead)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
            reply = b""
            while b"request_timeout" not in reply and (part := sock.recv(4096)):
                reply += part
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


# -- small ones --------------------------------------------------------------------------------------


def test_trailing_slash_head_health_and_token_range_param(client: httpx.Client) -> None:
    r = client.post("/v1/completions/", json={"prompt": "a", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(2)
    assert client.get("/v1/models/").json()["data"][0]["id"] == MODEL
    h = client.head("/health")
    assert h.status_code == 200 and h.content == b""
    r = client.post("/v1/completions", json={"prompt": [1, 256], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "0..255" in r.json()["error"]["message"]


def test_model_detail_has_its_own_metrics_label(client: httpx.Client) -> None:
    client.get(f"/v1/models/{MODEL}")
    text = client.get("/metrics").text
    assert 'omnikv_requests_total{endpoint="/v1/models/{id}",status="200"}' in text


def test_omnikv_logger_writes_with_the_server_log_config() -> None:
    code = (
        "import logging.config; from omnikv.server.runner import log_config; "
        "logging.config.dictConfig(log_config('info')); "
        "logging.getLogger('omnikv.server').info('request cancelled by its client')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "request cancelled by its client" in out.stderr, out


def test_port_in_use_is_reported_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from omnikv.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # "/nonexistent" would fail to load: the port error must come first.
        assert main(["serve", "--model", "/nonexistent", "--method", "full", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err, err
