"""Unit tests of the server's pieces that need no HTTP: stop strings, request parsing, the scheduler."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnikv.server.api_errors import APIError, from_exception
from omnikv.server.protocol import EngineResult, GenRequest
from omnikv.server.runner import is_loopback
from omnikv.server.scheduler import Job, QueueFull, Scheduler
from omnikv.server.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from omnikv.decoding.stops import StopMatcher
from omnikv.errors import InputError, ResourceError

# -- stop strings --------------------------------------------------------------------------------


def reference_stop(text: str, stop: str) -> tuple[str, bool]:
    """Text before the first occurrence of one stop string (brute force over positions)."""
    for i in range(len(text) + 1):
        if text.startswith(stop, i):
            return text[:i], True
    return text, False


def _feed(text: str, stops: list[str], cuts: list[int]) -> tuple[str, bool]:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    m = StopMatcher(stops)
    out = "".join(m.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + m.flush()
    return out, m.stopped


_ALPHABET = "ab\nc"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=30), stop=st.text(alphabet=_ALPHABET, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 30), max_size=10))
def test_single_stop_equals_reference_for_any_split(text: str, stop: str, cuts: list[int]) -> None:
    assert _feed(text, [stop], cuts) == reference_stop(text, stop)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=_ALPHABET, max_size=30),
    stops=st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_several_stops_invariants(text: str, stops: list[str], cuts: list[int]) -> None:
    # With overlapping stop strings the cut may depend on how text arrives ("ac" then "a" with
    # stops "c" and "aca" stops at "c", as a model would), so check what must hold for any split.
    out, stopped = _feed(text, stops, cuts)
    assert text.startswith(out)
    assert not any(s in out for s in stops)  # never emits a complete stop string
    if stopped:
        assert any(text.startswith(s, len(out)) for s in stops)  # cut exactly where one begins
    else:
        assert out == text and not any(s in text for s in stops)


def test_stop_matcher_holds_back_partial_stop_only() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.feed("Hello\nUs") == "Hello"  # "\nUs" could start the stop string
    assert m.feed("e") == ""
    assert m.feed("d it") == "\nUsed it"  # it did not: released
    assert m.feed("\nUser: hi") == "" and m.stopped
    assert m.feed("more") == "" and m.flush() == ""


# -- request parsing -----------------------------------------------------------------------------


def test_parse_valid_chat_defaults_and_content_parts() -> None:
    req = parse_body(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "stop": "x", "user": "ignored"}')
    assert isinstance(req, ChatCompletionRequest)
    assert req.messages[0].text() == "ab"
    assert req.requested_max_tokens() == 7
    assert req.stop_tuple() == ("x",)
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.stream is False


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": "yes"}}', "stream_options.include_usage"),
        (b'{"messages": [{"role": "user", "content": "a"}], "logprobs": "yes"}', "logprobs"),
        (b'{"messages": [{"role": "user"}]}', "messages[0]"),
        (b'{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"1": 2}}', "logit_bias"),
        (b'{"messages": [{"role": "user", "content": "a"}], "presence_penalty": 0.5}', "presence_penalty"),
        (b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": true}', "max_tokens"),
    ],
)
def test_parse_errors_name_the_field(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, body)
    assert info.value.status == 400 and info.value.param == param
    assert param in info.value.message


def test_completion_prompt_forms() -> None:
    def prompts(body: bytes) -> list:
        req = parse_body(CompletionRequest, body)
        assert isinstance(req, CompletionRequest)
        return req.prompts()

    assert prompts(b'{"prompt": "one"}') == ["one"]
    assert prompts(b'{"prompt": ["one", "two"]}') == ["one", "two"]
    assert prompts(b'{"prompt": [1, 2, 3]}') == [[1, 2, 3]]
    assert prompts(b'{"prompt": [[1, 2], [3]]}') == [[1, 2], [3]]
    with pytest.raises(APIError, match="must not be empty"):
        parse_body(CompletionRequest, b'{"prompt": []}')
    with pytest.raises(APIError, match="must equal n"):
        parse_body(CompletionRequest, b'{"prompt": "a", "best_of": 3}')
    with pytest.raises(APIError) as info:  # a mix of text and token ids is no prompt form
        parse_body(CompletionRequest, b'{"prompt": ["a", [1]]}')
    assert info.value.param == "prompt"
    assert parse_body(CompletionRequest, b'{"prompt": "a", "n": 2, "best_of": 2}').n == 2


def test_error_mapping() -> None:
    assert from_exception(InputError("too long")).status == 400
    assert from_exception(ResourceError("no memory")).status == 503
    internal = from_exception(KeyError("secret detail"))
    assert internal.status == 500 and "secret" not in internal.message
    body = APIError(404, "nope", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


# -- scheduler -----------------------------------------------------------------------------------


class EchoEngine:
    name = "echo"
    max_context = None

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.order: list[int] = []

    def encode_prompt(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def encode_chat(self, messages):  # pragma: no cover - unused here
        raise NotImplementedError

    def generate(self, req: GenRequest, on_token) -> EngineResult:
        self.gate.wait(10)
        self.order.append(req.prompt_ids[0])
        text = "".join(chr(i) for i in req.prompt_ids)
        for ch in text:
            on_token(ch)
        return EngineResult(text, len(req.prompt_ids), len(text), "length")


def _drain(job: Job, loop: asyncio.AbstractEventLoop, until: str = "done", timeout: float = 10.0) -> list[tuple[str, object]]:
    async def run() -> list[tuple[str, object]]:
        events = []
        while True:
            ev = await asyncio.wait_for(job.events.get(), timeout)
            events.append(ev)
            if ev[0] in (until, "error"):
                return events

    return loop.run_until_complete(run())


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_scheduler_fifo_bound_cancel_and_stop() -> None:
    loop = asyncio.new_event_loop()
    engine = EchoEngine()
    sched = Scheduler(engine, max_queue=2)
    sched.start()
    try:
        jobs = [Job(lambda e, s=s: [GenRequest(e.encode_prompt(s), 5)], loop) for s in ("a", "b", "c", "d")]
        sched.submit(jobs[0])
        _wait(lambda: sched.running == 1)
        sched.submit(jobs[1])
        sched.submit(jobs[2])
        with pytest.raises(QueueFull):
            sched.submit(jobs[3])
        sched.cancel(jobs[1])  # leaves the queue at once: room for another
        assert sched.waiting == 1
        sched.submit(jobs[3])
        engine.gate.set()
        texts = []
        for j in (jobs[0], jobs[2], jobs[3]):
            events = _drain(j, loop)
            assert events[0][0] == "start" and events[-1][0] == "done"
            texts.append("".join(v[1] for k, v in events if k == "text"))
        assert texts == ["a", "c", "d"]
        assert engine.order == [ord("a"), ord("c"), ord("d")]  # FIFO, cancelled "b" never ran
    finally:
        sched.stop()
        loop.close()
    assert not sched.alive
    with pytest.raises(APIError) as info:
        sched.submit(Job(lambda e: [GenRequest([1], 1)], asyncio.new_event_loop()))
    assert info.value.status == 503


def test_scheduler_survives_prepare_and_engine_errors() -> None:
    loop = asyncio.new_event_loop()
    engine = EchoEngine()
    engine.gate.set()
    sched = Scheduler(engine, max_queue=4)
    sched.start()
    try:
        def bad_prepare(e):
            raise APIError(400, "prompt too long", code="context_length_exceeded")

        j1 = Job(bad_prepare, loop)
        sched.submit(j1)
        ev = _drain(j1, loop)[-1]
        assert ev[0] == "error" and ev[1].status == 400
        j2 = Job(lambda e: [GenRequest([1], 3)], loop)  # now the engine itself fails
        engine.generate = lambda req, on_token: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        sched.submit(j2)
        ev = _drain(j2, loop)[-1]
        assert ev[0] == "error" and ev[1].status == 500
        assert sched.alive
    finally:
        sched.stop()
        loop.close()
