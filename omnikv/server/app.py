"""FastAPI app factory for the OpenAI-compatible API.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
POST /tokenize, POST /detokenize, GET /version, GET|HEAD /health, GET /metrics (Prometheus text).
Every error is OpenAI error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from omnikv.server.api_errors import APIError
from omnikv.server.metrics import CONTENT_TYPE, ServerMetrics
from omnikv.server.middleware import LOOPBACK_HOSTS, AccountingMiddleware, BodyLimitMiddleware, RequestGuardMiddleware
from omnikv.server.formats import ChatFormat, CompletionFormat, ResponseFormat
from omnikv.server.protocol import ChatMessage, EngineLike, GenRequest
from omnikv.server.scheduler import Job, QueueFull, Scheduler
from omnikv.server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body
from omnikv.server.streaming import next_event, sse_stream

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
DEFAULT_BODY_TIMEOUT_S = 30.0
_FALLBACK_MAX_TOKENS_LIMIT = 4096  # when the model does not declare its context length
GREEDY_BELOW_TEMPERATURE = 1e-5  # as omnikv.decoding.generation (kept here: this module imports no torch)

Encode = Callable[[EngineLike], list[int]]


def create_app(
    engine: EngineLike,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    shutdown_drain_s: float = 3.0,
) -> FastAPI:
    """Build the app around `engine`; its worker thread runs while the app's lifespan is active.

    max_queue: requests allowed to wait while one runs; more are refused with 429 at once.
    max_body_bytes: larger request bodies get 413.
    max_prompt_tokens: longer prompts get 400 (the model's own context length always applies).
    max_tokens_limit: largest accepted `max_tokens` (default: the model's context length).
    default_max_tokens: completion length when a request gives no `max_tokens`.
    allowed_hosts: accepted `Host` header names (any port), against DNS rebinding; default the
        loopback names; None accepts any (for a server bound to a public address).
    body_timeout_s: a request body not complete this long after its headers gets 408.
    shutdown_drain_s: on SIGTERM, how long running requests may still finish (`begin_shutdown`).
    """
    for name, value in (("max_queue", max_queue), ("max_body_bytes", max_body_bytes), ("default_max_tokens", default_max_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_tokens_limit is None:
        max_tokens_limit = engine.max_context or _FALLBACK_MAX_TOKENS_LIMIT
    limits = _Limits(engine.max_context, max_prompt_tokens, max_tokens_limit, default_max_tokens, getattr(engine, "max_token_chars", None))

    metrics_holder: dict[str, Scheduler] = {}
    metrics = ServerMetrics(
        queue_length=lambda: metrics_holder["s"].waiting, running=lambda: metrics_holder["s"].running
    )
    scheduler = Scheduler(engine, max_queue, on_start=metrics.queue_wait.observe, on_result=metrics.observe_result)
    metrics_holder["s"] = scheduler

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="omnikv", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.begin_shutdown = lambda: scheduler.begin_shutdown(shutdown_drain_s)  # see runner.py
    created = int(time.time())

    # -- errors ----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = {404: f"Unknown path {request.url.path}.", 405: f"Method {request.method} is not allowed on {request.url.path}."}
        return APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:  # pragma: no cover - bodies are parsed by parse_body
        return APIError(400, f"Invalid request: {exc.errors()[0].get('msg', 'validation failed')}.").response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        return APIError(500, "Internal server error; see the server log.", code="internal_error").response()

    # -- auth ------------------------------------------------------------------------------------
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest on bytes: constant time in the token's content (not in its length).
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- routes ----------------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": engine.name, "queue_length": scheduler.waiting, "running": scheduler.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_auth(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> Response:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as pkg_version

        try:
            v = pkg_version("omnikv")
        except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
            v = "unknown"
        return JSONResponse({"version": v})

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "omnikv", "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        check_auth(request)
        _check_model(engine, model_id)
        return JSONResponse(model_card())

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        check_auth(request)
        req = parse_body(TokenizeRequest, await request.body())
        assert isinstance(req, TokenizeRequest)
        _check_model(engine, req.model)
        if req.messages is not None:
            messages = _chat_messages(req.messages)
            limits.check_chars(sum(len(m.content) for m in messages), "messages")
            ids = await asyncio.to_thread(_text_tool(engine, "tokenize"), messages, add_special_tokens=req.add_generation_prompt)
        else:
            assert req.prompt is not None
            limits.check_chars(len(req.prompt), "prompt")
            ids = await asyncio.to_thread(_text_tool(engine, "tokenize"), req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_context, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        check_auth(request)
        req = parse_body(DetokenizeRequest, await request.body())
        assert isinstance(req, DetokenizeRequest)
        _check_model(engine, req.model)
        _check_token_ids(engine, req.tokens, "tokens")
        text = await asyncio.to_thread(_text_tool(engine, "detokenize"), req.tokens)
        return JSONResponse({"prompt": text})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(ChatCompletionRequest, await request.body())
        assert isinstance(req, ChatCompletionRequest)
        messages = _chat_messages(req.messages)
        limits.check_chars(sum(len(m.content) for m in messages), "messages")
        encode: Encode = lambda e: e.encode_chat(messages)  # noqa: E731
        return await _serve(request, req, [(encode, None)], ChatFormat(engine.name, req.n))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(CompletionRequest, await request.body())
        assert isinstance(req, CompletionRequest)
        prompts: list[tuple[Encode, str | None]] = []
        for k, prompt in enumerate(req.prompts()):
            param = "prompt" if len(req.prompts()) == 1 else f"prompt[{k}]"
            if isinstance(prompt, str):
                limits.check_chars(len(prompt), param)
                prompts.append((lambda e, text=prompt: e.encode_prompt(text), prompt))
            else:
                if not prompt:
                    raise APIError(400, f"Invalid value for '{param}': a token-id prompt must not be empty.", param=param, code="empty_prompt")
                _check_token_ids(engine, prompt, param)
                prompts.append((lambda e, ids=prompt: list(ids), None))
        return await _serve(request, req, prompts, CompletionFormat(engine.name, req.n, echo=req.echo))

    async def _serve(request: Request, req: Any, prompts: list[tuple[Encode, str | None]], fmt: ResponseFormat) -> Response:
        _check_model(engine, req.model)
        max_tokens = req.requested_max_tokens()
        echo = bool(getattr(req, "echo", False))
        lowest = 0 if echo else 1  # with echo, max_tokens 0 scores the prompt without generating
        if max_tokens is not None and not lowest <= max_tokens <= limits.max_tokens_limit:
            raise APIError(
                400, f"Invalid value for 'max_tokens': {max_tokens}; it must be between {lowest} and {limits.max_tokens_limit}.", param="max_tokens", code="invalid_value"
            )
        job = Job(_prepare(limits, prompts, req, max_tokens), asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(
                429, f"The server is busy: {scheduler.max_queue} requests are already waiting. Retry shortly.", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        first = await next_event(job, request, scheduler)
        if first is None:  # the client left while waiting; nobody reads this
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        if req.stream:
            # Wait for the first piece before sending headers, so a failure before any output is
            # still a plain HTTP error (status + JSON) rather than an error inside a 200 stream.
            second = await next_event(job, request, scheduler)
            if second is None:
                return Response(status_code=499)
            if second[0] == "error":
                raise second[1]
            return StreamingResponse(
                sse_stream(job, request, scheduler, fmt, second, req.include_usage(), len(prompts)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        while True:
            ev = await next_event(job, request, scheduler)
            if ev is None:
                return Response(status_code=499)
            if ev[0] == "error":
                raise ev[1]
            if ev[0] == "done":
                results = ev[1]
                if echo:  # a text prompt echoes as sent, not as its tokens decode
                    texts = [t for _, t in prompts for _ in range(req.n)]
                    results = [replace(r, prompt_text=t) if t is not None else r for r, t in zip(results, texts)]
                return JSONResponse(fmt.full(results))

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(RequestGuardMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(AccountingMiddleware, metrics=metrics)  # outermost: also counts 413s
    return app


class _Limits:
    def __init__(self, max_context: int | None, max_prompt_tokens: int | None, max_tokens_limit: int, default_max_tokens: int, max_token_chars: int | None) -> None:
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens
        token_limit = min((x for x in (max_context, max_prompt_tokens) if x is not None), default=None)
        # No prompt longer than this many characters can fit, so it is refused before anyone
        # tokenizes it (tokenizing megabytes would hold the single worker for seconds).
        self.max_prompt_chars = token_limit * max_token_chars if token_limit is not None and max_token_chars else None

    def check_chars(self, n_chars: int, param: str) -> None:
        if self.max_prompt_chars is not None and n_chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"The prompt has {n_chars} characters: more than {self.max_prompt_chars}, so more tokens than this server accepts. Shorten the prompt.",
                param=param,
                code="prompt_too_long",
            )


def _chat_messages(messages: list[Any]) -> list[ChatMessage]:
    return [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in messages]


def _text_tool(engine: EngineLike, name: str) -> Callable[..., Any]:
    fn = getattr(engine, name, None)
    if fn is None:
        raise APIError(404, f"This server's engine does not offer /{name}.", code="not_supported")
    return fn


def _check_token_ids(engine: EngineLike, ids: list[int], param: str) -> None:
    vocab = getattr(engine, "vocab_size", None)
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        upper = f"0..{vocab - 1}" if vocab is not None else ">= 0"
        raise APIError(400, f"Invalid value for '{param}': token id {bad} is outside this model's vocabulary ({upper}).", param=param, code="invalid_value")


def _check_model(engine: EngineLike, model: str | None) -> None:
    if model is not None and model != engine.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.name}'.", param="model", code="model_not_found")


def _prepare(limits: _Limits, prompts: list[tuple[Encode, str | None]], req: Any, max_tokens: int | None) -> Callable[[EngineLike], list[GenRequest]]:
    """Build the worker-side step: tokenize (the tokenizer belongs to the worker thread) and check lengths."""

    def prepare(engine: EngineLike) -> list[GenRequest]:
        return [_one(limits, encode(engine), req, max_tokens, k if len(prompts) > 1 else None) for k, (encode, _) in enumerate(prompts)]

    return prepare


def _one(limits: _Limits, ids: list[int], req: Any, max_tokens: int | None, k: int | None) -> GenRequest:
    n = len(ids)
    param = "prompt" if k is None else f"prompt[{k}]"
    if n == 0:
        raise APIError(400, "The prompt is empty.", param=param, code="empty_prompt")
    if limits.max_prompt_tokens is not None and n > limits.max_prompt_tokens:
        raise APIError(
            400, f"The prompt has {n} tokens; this server accepts at most {limits.max_prompt_tokens} (--max-prompt-tokens).", code="prompt_too_long"
        )
    ctx = limits.max_context
    if ctx is not None and n >= ctx:
        raise APIError(
            400, f"This model's maximum context length is {ctx} tokens, but the prompt has {n} tokens. Shorten the prompt.", code="context_length_exceeded"
        )
    if max_tokens is None:
        budget = limits.default_max_tokens if ctx is None else min(limits.default_max_tokens, ctx - n)
    elif ctx is not None and n + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens, but {n + max_tokens} were requested ({n} in the prompt, {max_tokens} for the completion). Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    else:
        budget = max_tokens
    # top_p = 0 keeps only the most likely token, and a temperature too small to divide by
    # (< 1e-5, as vLLM) is the limit of sharpening: both are greedy decoding.
    greedy = req.top_p == 0 or req.temperature < GREEDY_BELOW_TEMPERATURE
    echo = bool(getattr(req, "echo", False))
    logprobs = req.top_logprobs_count()
    return GenRequest(
        ids,
        budget,
        0.0 if greedy else req.temperature,
        1.0 if req.top_p == 0 else req.top_p,
        req.seed,
        req.stop_tuple(),
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        min_tokens=min(req.min_tokens, budget),
        ignore_eos=req.ignore_eos,
        n=req.n,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
        echo=echo,
    )
