"""The server on real models: a tiny random checkpoint (fast) and the embedded SmolLM2 (slow).

Served answers are compared with `omnikv.decoding.generation.generate` called directly on the same token ids,
so the HTTP path (templating, tokenization, sampling settings, stop strings, usage) is checked
against the library, not against recorded outputs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from omnikv.config import OmniKVConfig
from omnikv.decoding.generation import SamplingParams, generate
from omnikv.methods import get_method
from omnikv.models import load_model
from omnikv.server import ChatMessage, Engine, EngineResult, GenRequest, ServerThread, create_app
from omnikv.models.tiny import make_tiny_checkpoint

TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module", params=["full", "omnikv"])
def served(request: pytest.FixtureRequest, tiny) -> Iterator[tuple[ServerThread, Engine]]:
    # OmniKV proper on 4 layers: layer 1 filters, layers 2-3 attend to 16 of the ~90 prompt tokens.
    sparse = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=16, sink_tokens=2, recent_tokens=4)
    method = get_method("omnikv", config=sparse) if request.param == "omnikv" else get_method("full")
    engine = Engine.from_loaded(tiny, method)
    with ServerThread(create_app(engine, max_queue=4)) as srv:
        yield srv, engine


def direct(engine: Engine, ids: list[int], **params) -> str:
    return generate(engine.model, engine.tokenizer, ids, engine.method, SamplingParams(**params)).text


def test_completion_equals_direct_generate(served: tuple[ServerThread, Engine]) -> None:
    srv, engine = served
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    ids = engine.encode_prompt(prompt)
    expected = generate(engine.model, engine.tokenizer, ids, engine.method, SamplingParams(max_new_tokens=12, temperature=0.0))
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        body = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == len(ids) == len(engine.tokenizer(prompt)["input_ids"])
    assert body["usage"]["completion_tokens"] == expected.generated_tokens
    vocab = engine.model.get_input_embeddings().num_embeddings
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        by_ids = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0}).json()
        assert by_ids["choices"][0]["text"] == expected.text
        bad = c.post("/v1/completions", json={"prompt": [1, vocab], "max_tokens": 2})
        assert bad.status_code == 400 and f"{vocab}" in bad.json()["error"]["message"]


def test_openai_client_chat_uses_template_stream_and_not(served: tuple[ServerThread, Engine]) -> None:
    srv, engine = served
    assert engine.has_chat_template  # the tiny tokenizer carries a ChatML template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    templated = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(templated, add_special_tokens=False)["input_ids"]
    expected = direct(engine, ids, max_new_tokens=10, temperature=0.0)
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    chat = oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens == len(ids)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=10, temperature=0, stream=True)
        if ch.choices
    )
    assert streamed == expected


def test_seed_and_stop_on_real_model(served: tuple[ServerThread, Engine]) -> None:
    srv, engine = served
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        def text(**kw) -> dict:
            return c.post("/v1/completions", json={"prompt": "Once upon a time", **kw}).json()["choices"][0]

        a = text(max_tokens=16, temperature=1.0, seed=11)
        assert a == text(max_tokens=16, temperature=1.0, seed=11)
        assert a["text"] == direct(engine, engine.encode_prompt("Once upon a time"), max_new_tokens=16, temperature=1.0, seed=11)
        full = text(max_tokens=16, temperature=0)["text"]
        # A stop string from inside the greedy answer (random weights: skip undecodable bytes).
        windows = [full[i : i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i : i + 2]]
        assert windows, f"no usable stop string in {full!r}"
        got = text(max_tokens=16, temperature=0, stop=["@@never@@", windows[0]])
        assert got["text"] == full[: full.find(windows[0])]
        assert got["finish_reason"] == "stop"


def test_batched_rows_equal_single_generation(served: tuple[ServerThread, Engine]) -> None:
    """Left-padded batch through the method's cache == each request generated alone."""
    _, engine = served
    prompts = ["The quick brown fox jumps over the lazy dog. " * 2, "Hello there", "Once upon a time, in a land far away"]
    reqs = [GenRequest(engine.encode_prompt(p), n) for p, n in zip(prompts, (8, 4, 6))]
    alone = [generate(engine.model, engine.tokenizer, r.prompt_ids, engine.method, SamplingParams(max_new_tokens=r.max_tokens)) for r in reqs]
    pieces: list[list[str]] = [[] for _ in reqs]

    def leaver(piece: str) -> None:
        raise ConnectionError("client gone")

    results = engine.generate_batch(reqs + [reqs[0]], [p.append for p in pieces] + [leaver])
    for res, ref, got in zip(results, alone, pieces):
        assert isinstance(res, EngineResult)
        assert (res.text, res.completion_tokens, res.finish_reason) == (ref.text, ref.generated_tokens, ref.finish_reason)
        assert "".join(got) == res.text
    assert isinstance(results[3], ConnectionError)  # that row stopped; the others finished


def test_cli_serve_subprocess(tiny_dir: Path, tmp_path: Path) -> None:
    """`omnikv serve` as users run it: real process, loopback port, API key from the environment."""
    with socket.socket() as s:  # a free port (tiny race window; the server binds it right away)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMNIKV_API_KEY": "k123"}
    cmd = [sys.executable, "-m", "omnikv", "serve", "--model", str(tiny_dir), "--method", "full", "--port", str(port), "--log-level", "warning"]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        # generous: a cold start imports torch + transformers + fastapi, which took > 60 s on a
        # 2-core machine under load 17; a hung server still fails, with its log
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"server exited: {Path(log.name).read_text()}"
            assert time.monotonic() < deadline, f"server did not come up in 240 s: {Path(log.name).read_text()}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 401
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, headers={"Authorization": "Bearer k123"})
            assert r.status_code == 200 and r.json()["model"] == "tiny-llama"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_cli_rejects_bad_limits_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from omnikv.cli import main

    assert main(["serve", "--model", "/nonexistent", "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent", "--method", "full", "--preset", "x.json"]) == 2
    assert "omnikv method only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # an argparse error: usage + message, exit code 2
        main(["serve", "--model", "/nonexistent", "--prefix-cache-bytes", "lots"])
    assert exit_info.value.code == 2 and "is not a size" in capsys.readouterr().err


def test_serve_defaults_chunk_the_prefill_and_keep_prefixes() -> None:
    from omnikv.cli import build_parser
    from omnikv.cli.cmd_serve import parse_bytes
    from omnikv.decoding.prefix_cache import default_max_bytes

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.prefill_chunk_size == 512  # a client that leaves frees the server within a chunk
    assert args.prefix_cache_bytes is None and default_max_bytes() > 0
    assert args.default_max_tokens is None  # per endpoint: 16 for completions, 256 for chat
    assert [parse_bytes(t) for t in ("0", "4GiB", "512MB", "1.5KiB", "2_000")] == [0, 4 << 30, 512 * 10**6, 1536, 2000]


def test_chat_template_kwargs_reach_the_template(tiny) -> None:
    engine = Engine.from_loaded(tiny, get_method("full"))
    saved = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{% for m in messages %}{{ greeting | default('') }}{{ m['content'] }}{% endfor %}"
    try:
        plain = engine.encode_chat([ChatMessage("user", "x")])
        kw = engine.encode_chat([ChatMessage("user", "x")], template_kwargs={"greeting": "hi "})
    finally:
        engine.tokenizer.chat_template = saved
    assert engine.tokenizer.decode(kw) == "hi x" and engine.tokenizer.decode(plain) == "x"


@pytest.mark.slow
def test_embedded_smollm2_with_openai_client() -> None:
    lm = load_model("smollm2")
    engine = Engine.from_loaded(lm, get_method("omnikv"))
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    templated = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(templated, add_special_tokens=False)["input_ids"]
    expected = direct(engine, ids, max_new_tokens=8, temperature=0.0)
    with ServerThread(create_app(engine)) as srv:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        chat = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == expected
        assert "Paris" in expected
        assert chat.usage.prompt_tokens == len(ids)
