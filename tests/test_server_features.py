"""OpenAI-compatible features on a real (tiny, random) model, driven with the `openai` client.

Every expected value is computed here from the model itself: logprobs from a plain full-sequence
forward pass (the slow, obviously-correct reference) or from `teacher_forced_logits` through the
method's cache; sampled choices from `omnikv.decoding.generation.generate` with the same seed.
"""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import openai
import pytest
import torch

from omnikv.config import OmniKVConfig
from omnikv.decoding.generation import SamplingParams, generate, teacher_forced_logits
from omnikv.methods import get_method
from omnikv.models import load_model
from omnikv.server import ChatMessage, Engine, ServerThread, create_app
from omnikv.models.tiny import make_tiny_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", family="llama")))


@pytest.fixture(scope="module", params=["full", "omnikv"])
def served(request: pytest.FixtureRequest, tiny) -> Iterator[tuple[openai.OpenAI, Engine, str]]:
    sparse = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=16, sink_tokens=2, recent_tokens=4)
    method = get_method("omnikv", config=sparse) if request.param == "omnikv" else get_method("full")
    engine = Engine.from_loaded(tiny, method)
    with ServerThread(create_app(engine, max_queue=4)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60), engine, srv.url


def direct(engine: Engine, ids: list[int], **params):
    return generate(engine.model, engine.tokenizer, ids, engine.method, SamplingParams(**params))


@torch.inference_mode()
def full_forward_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(T, V): row j = log-probabilities of the token after ids[: j + 1], one plain forward pass."""
    return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_echo_logprobs_equal_reference(served) -> None:
    oai, engine, _ = served
    ids = engine.encode_prompt(PROMPT)
    out = direct(engine, ids, max_new_tokens=6)
    comp = oai.completions.create(model=engine.name, prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True)
    choice = comp.choices[0]
    lp = choice.logprobs
    n, m = len(ids), len(out.token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + m
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    # Prompt: the prefill is full attention for every method, so a plain forward is the reference.
    ref = full_forward_logprobs(engine, ids)
    expected_prompt = [float(ref[j - 1, ids[j]]) for j in range(1, n)]
    assert lp.token_logprobs[1:n] == pytest.approx(expected_prompt, abs=1e-4)
    # Completion: the method's own decoding (sparse for omnikv), teacher-forced token by token.
    tf = torch.log_softmax(teacher_forced_logits(engine.model, ids, out.token_ids, engine.method), dim=-1)
    assert lp.token_logprobs[n:] == pytest.approx([float(tf[i, t]) for i, t in enumerate(out.token_ids)], abs=1e-4)
    # top_logprobs[i]: the 3 most likely tokens at position i plus the chosen one, keyed by text
    # (tokens that decode alike, such as partial UTF-8 bytes, share a key: OpenAI's format).
    rows = torch.cat([ref[: n - 1], tf])
    for i in range(1, n + m):
        top = lp.top_logprobs[i]
        best = rows[i - 1].topk(3).indices.tolist()
        assert set(top) == {engine.tokenizer.decode([t]) for t in best} | {lp.tokens[i]}
        assert max(top.values()) == pytest.approx(float(rows[i - 1].max()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert choice.text == engine.tokenizer.decode(ids, skip_special_tokens=True) + out.text
    assert comp.usage.prompt_tokens == n and comp.usage.completion_tokens == m


def test_echo_max_tokens_zero_scores_prompt_only(served) -> None:
    oai, engine, _ = served
    comp = oai.completions.create(model=engine.name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    ids = engine.encode_prompt(PROMPT)
    ref = full_forward_logprobs(engine, ids)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text == PROMPT  # a text prompt echoes as sent
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    assert comp.usage.completion_tokens == 0


def test_scoring_request_whose_next_token_is_eos_returns_the_eos(served, tiny) -> None:
    """lm-eval's loglikelihood: echo + logprobs + max_tokens 1, then it drops the last logprob as the
    generated token's. When the greedy next token is EOS, that EOS must be the returned output
    token, or a real prompt token would be dropped instead (a silently wrong score)."""
    oai, engine, _ = served
    ids = engine.encode_prompt(PROMPT)
    ref = full_forward_logprobs(engine, ids)
    eos = int(ref[-1].argmax())  # make the model's greedy continuation of this prompt its EOS
    saved = (tiny.model.generation_config.eos_token_id, tiny.tokenizer.eos_token_id)
    tiny.model.generation_config.eos_token_id = eos
    try:
        tiny.tokenizer.eos_token_id = eos
        comp = oai.completions.create(model=engine.name, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    finally:
        tiny.model.generation_config.eos_token_id, tiny.tokenizer.eos_token_id = saved
    choice, n = comp.choices[0], len(ids)
    lp = choice.logprobs
    assert choice.finish_reason == "stop" and comp.usage.completion_tokens == 1
    assert choice.text == engine.tokenizer.decode(ids, skip_special_tokens=True)  # the EOS adds no text
    assert len(lp.token_logprobs) == n + 1 and lp.tokens[-1] == engine.tokenizer.decode([eos])
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, eos]), abs=1e-4)
    # What lm-eval computes for the continuation ids[ctx:]: exactly the offline forward pass.
    ctx = n - 5
    assert sum(lp.token_logprobs[ctx:-1]) == pytest.approx(sum(float(ref[j - 1, ids[j]]) for j in range(ctx, n)), abs=1e-3)


def test_streamed_logprobs_are_the_non_streamed_ones(served) -> None:
    oai, engine, _ = served
    messages = [{"role": "user", "content": "Name a colour."}]
    kw = dict(model=engine.name, max_tokens=6, temperature=0, stop=["zz"])
    whole = oai.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    chunks = list(oai.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stream=True, **kw))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in whole.choices[0].logprobs.content]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    ids = engine.encode_prompt(PROMPT)
    whole = oai.completions.create(prompt=ids, logprobs=2, **kw)
    chunks = list(oai.completions.create(prompt=ids, logprobs=2, stream=True, **kw))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.choices[0].logprobs.tokens
    assert [x for p in parts for x in p.token_logprobs] == whole.choices[0].logprobs.token_logprobs
    assert [x for p in parts for x in p.text_offset] == whole.choices[0].logprobs.text_offset


def test_assistant_prefill_continues_the_final_message(served) -> None:
    """vLLM's continue_final_message + add_generation_prompt false: the last (assistant) message
    stays open and the model continues it; with echo the answer starts with it."""
    oai, engine, _ = served
    turns = [ChatMessage("user", "Name a colour."), ChatMessage("assistant", "The colour is")]
    ids = engine.encode_chat(turns, add_generation_prompt=False, continue_final_message=True)
    closed = engine.encode_chat(turns, add_generation_prompt=False)
    assert closed[: len(ids)] == ids and len(closed) > len(ids)  # open: no end of turn after the prefill
    messages = [{"role": m.role, "content": m.content} for m in turns]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    chat = oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0, extra_body=extra)
    assert chat.choices[0].message.content == direct(engine, ids, max_new_tokens=5).text
    assert chat.usage.prompt_tokens == len(ids)
    echoed = oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == "The colour is" + chat.choices[0].message.content


def test_tokenizer_info_and_token_id_names(served) -> None:
    oai, engine, url = served
    info = httpx.get(url + "/tokenizer_info").json()
    tok = engine.tokenizer
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == engine.max_context
    ids = engine.encode_prompt(PROMPT)
    comp = oai.completions.create(model=engine.name, prompt=ids, max_tokens=3, temperature=0, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    out = direct(engine, ids, max_new_tokens=3)
    assert comp.choices[0].logprobs.tokens == [f"token_id:{t}" for t in out.token_ids]


def test_chat_logprobs_and_top_logprobs(served) -> None:
    oai, engine, _ = served
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = engine.encode_chat([ChatMessage("user", "Name a colour.")])
    out = direct(engine, ids, max_new_tokens=5)
    chat = oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    tf = torch.log_softmax(teacher_forced_logits(engine.model, ids, out.token_ids, engine.method), dim=-1)
    assert [c.logprob for c in content] == pytest.approx([float(tf[i, t]) for i, t in enumerate(out.token_ids)], abs=1e-4)
    for c, t in zip(content, out.token_ids):
        assert c.token == engine.tokenizer.decode([t]) and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy: the chosen is the best
    plain = oai.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_fork_the_prefill_and_equal_seeded_singles(served) -> None:
    oai, engine, _ = served
    ids = engine.encode_prompt(PROMPT)
    comp = oai.completions.create(model=engine.name, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in comp.choices] == [0, 1, 2]
    expected = [direct(engine, ids, max_new_tokens=8, temperature=1.0, seed=7 + i) for i in range(3)]
    assert [c.text for c in comp.choices] == [e.text for e in expected]
    assert len({c.text for c in comp.choices}) > 1  # three seeds, one answer: the fork would be shared state
    assert comp.usage.prompt_tokens == len(ids)  # the prompt counts once
    assert comp.usage.completion_tokens == sum(e.generated_tokens for e in expected)
    chat = oai.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_several_prompts_and_token_id_lists(served) -> None:
    oai, engine, _ = served
    texts = ["Hello there", "Once upon a time"]
    singles = [direct(engine, engine.encode_prompt(t), max_new_tokens=5).text for t in texts]
    by_text = oai.completions.create(model=engine.name, prompt=texts, max_tokens=5, temperature=0)
    assert [c.text for c in by_text.choices] == singles
    by_ids = oai.completions.create(model=engine.name, prompt=[engine.encode_prompt(t) for t in texts], max_tokens=5, temperature=0, n=2)
    assert [c.text for c in by_ids.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert [c.index for c in by_ids.choices] == [0, 1, 2, 3]
    assert by_ids.usage.prompt_tokens == sum(len(engine.encode_prompt(t)) for t in texts)


def reference_greedy_with_penalty(engine: Engine, ids: list[int], steps: int, penalty: float) -> list[int]:
    """CTRL repetition penalty written out: a seen token's logit is divided by the penalty if
    positive, multiplied if negative; plain full forward passes, argmax."""
    seq = list(ids)
    out = []
    for _ in range(steps):
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([seq])).logits[0, -1].float().tolist()
        for t in set(seq):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        tok = max(range(len(logits)), key=logits.__getitem__)
        out.append(tok)
        seq.append(tok)
    return out


def test_sampling_fields_top_k_min_p_repetition_penalty(served) -> None:
    oai, engine, _ = served
    ids = engine.encode_prompt(PROMPT)
    greedy = direct(engine, ids, max_new_tokens=8).text

    def text(**kw) -> str:
        return oai.completions.create(model=engine.name, prompt=PROMPT, max_tokens=8, extra_body=kw.pop("extra", {}), **kw).choices[0].text

    # Keeping one candidate (top_k=1, or min_p=1: only tokens as likely as the best) is greedy.
    assert text(temperature=1.0, seed=3, extra={"top_k": 1}) == greedy
    assert text(temperature=1.0, seed=3, extra={"min_p": 1.0}) == greedy
    assert text(temperature=1e-40) == greedy  # tiny temperature: greedy, not a 500 (nan probabilities)
    if engine.method.name == "full":  # the reference runs plain forward passes (full attention)
        want = reference_greedy_with_penalty(engine, ids, 8, 1.8)
        got = direct(engine, ids, max_new_tokens=8, repetition_penalty=1.8)
        assert got.token_ids == want
        assert text(temperature=0, extra={"repetition_penalty": 1.8}) == got.text
        assert got.text != greedy  # the penalty changed something, so the check above means something


def test_min_tokens_and_ignore_eos(served, tiny) -> None:
    oai, engine, _ = served
    ids = engine.encode_prompt(PROMPT)
    first = direct(engine, ids, max_new_tokens=1).token_ids[0]
    # Make the greedy first token the end-of-sequence token: without min_tokens nothing is generated.
    saved = (tiny.model.generation_config.eos_token_id, tiny.tokenizer.eos_token_id)
    tiny.model.generation_config.eos_token_id = first
    try:
        tiny.tokenizer.eos_token_id = first
        assert direct(engine, ids, max_new_tokens=6).generated_tokens == 0

        def usage(**extra) -> tuple[int, str]:
            c = oai.completions.create(model=engine.name, prompt=ids, max_tokens=6, temperature=0, extra_body=extra)
            return c.usage.completion_tokens, c.choices[0].finish_reason

        assert usage() == (1, "stop")  # the EOS is the one output token (as vLLM counts it), no text
        n, _ = usage(min_tokens=3)
        assert n >= 3
        assert usage(ignore_eos=True) == (6, "length")
    finally:
        tiny.model.generation_config.eos_token_id, tiny.tokenizer.eos_token_id = saved


def test_tokenize_detokenize_version_and_models(served) -> None:
    oai, engine, url = served
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tokenize", json={"prompt": PROMPT})
        assert r.status_code == 200
        assert r.json() == {"count": len(engine.encode_prompt(PROMPT)), "max_model_len": engine.max_context, "tokens": engine.encode_prompt(PROMPT)}
        no_special = c.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
        assert no_special == list(engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat["tokens"] == engine.encode_chat([ChatMessage("user", "hi")])
        d = c.post("/detokenize", json={"tokens": engine.encode_prompt(PROMPT)})
        assert d.status_code == 200 and d.json()["prompt"] == engine.tokenizer.decode(engine.encode_prompt(PROMPT))
        bad = c.post("/detokenize", json={"tokens": [engine.vocab_size]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert c.post("/tokenize", json={}).json()["error"]["param"] == "prompt"
        v = c.get("/version").json()["version"]
        assert v and v[0].isdigit()
    model = oai.models.list().data[0]
    assert model.id == engine.name and model.model_extra["max_model_len"] == engine.max_context


def test_max_token_chars_bounds_real_tokenization(tiny) -> None:
    """The character pre-check refuses only prompts that cannot fit: chars <= tokens x max_token_chars."""
    engine = Engine.from_loaded(tiny, get_method("full"))
    samples = [PROMPT, "x" * 500, " " * 300, "<|im_start|>" * 20, "héllo wörld ✓ 日本語 " * 5, "\n\n\t  a"]
    for text in samples:
        assert len(text) <= len(engine.encode_prompt(text)) * engine.max_token_chars


def test_disconnect_during_prefill_stops_between_chunks(tiny) -> None:
    """A client that leaves while its long prompt is prefilled frees the engine at the next chunk."""
    engine = Engine.from_loaded(tiny, get_method("full"), prefill_chunk_size=8)
    calls: list[int] = []

    def slow_chunk(module, args, kwargs) -> None:  # test instrumentation: each forward takes 0.1 s
        calls.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs else 0)
        time.sleep(0.1)

    handle = engine.model.register_forward_pre_hook(slow_chunk, with_kwargs=True)
    app = create_app(engine, max_queue=2)
    try:
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            ids = engine.encode_prompt("a" * 400)  # 400 tokens = 50 chunks of 8, ~5 s of prefill
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}, timeout=0.6)
            deadline = time.monotonic() + 10
            while app.state.scheduler.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.state.scheduler.running == 0
            assert 0 < len(calls) < 30, calls  # stopped between chunks, long before the 50th
            calls.clear()
            ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
            assert ok.status_code == 200
    finally:
        handle.remove()
