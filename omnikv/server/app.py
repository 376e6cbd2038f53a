"""FastAPI app factory for the OpenAI-compatible API.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /version, GET|HEAD /health, GET /metrics
(Prometheus text). Every error is OpenAI error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from omnikv.server.api_errors import APIError
from omnikv.server.formats import ChatFormat, CompletionFormat, ResponseFormat
from omnikv.server.metrics import CONTENT_TYPE, ServerMetrics
from omnikv.server.middleware import LOOPBACK_HOSTS, AccountingMiddleware, AuthMiddleware, BodyLimitMiddleware, RequestGuardMiddleware
from omnikv.server.protocol import ChatMessage, EngineLike
from omnikv.server.requests import Encode, Limits, chat_encoder, check_token_ids, completion_encoders, prepare
from omnikv.server.scheduler import Job, QueueFull, Scheduler
from omnikv.server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body
from omnikv.server.streaming import next_event, sse_stream

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
_FALLBACK_MAX_TOKENS_LIMIT = 4096  # when the model does not declare its context length


@dataclass
class _Served:
    """What the routes share: the engine, its worker queue, the limits, the metrics."""

    engine: EngineLike
    scheduler: Scheduler
    limits: Limits
    metrics: ServerMetrics
    created: int


def create_app(
    engine: EngineLike,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    default_max_tokens: int | None = None,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    shutdown_drain_s: float = 3.0,
) -> FastAPI:
    """Build the app around `engine`; its worker thread runs while the app's lifespan is active.

    max_queue: requests allowed to wait while one runs; more are refused with 429 at once.
    max_body_bytes: larger request bodies get 413.
    max_prompt_tokens: longer prompts get 400 (the model's own context length always applies).
    max_tokens_limit: largest accepted `max_tokens` (default: the model's context length).
    default_max_tokens: completion length when a request gives no `max_tokens` (default: 16 for
        /v1/completions as OpenAI, 256 for chat; capped by the context left).
    allowed_hosts: accepted `Host` header names (any port), against DNS rebinding; default the
        loopback names; None accepts any (for a server bound to a public address).
    body_timeout_s: a request body not complete this long after its headers gets 408.
    shutdown_drain_s: on SIGTERM, how long running requests may still finish (`begin_shutdown`).
    """
    for name, value in (("max_queue", max_queue), ("max_body_bytes", max_body_bytes), ("default_max_tokens", default_max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_tokens_limit is None:
        max_tokens_limit = engine.max_context or _FALLBACK_MAX_TOKENS_LIMIT
    limits = Limits(engine.max_context, max_prompt_tokens, max_tokens_limit, default_max_tokens, getattr(engine, "max_token_chars", None))
    holder: list[Scheduler] = []
    metrics = ServerMetrics(queue_length=lambda: holder[0].waiting, running=lambda: holder[0].running,
                            prefix_cache=getattr(engine, "prefix_cache", None))
    scheduler = Scheduler(engine, max_queue, on_start=metrics.queue_wait.observe, on_result=metrics.observe_result)
    holder.append(scheduler)

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
    served = _Served(engine, scheduler, limits, metrics, int(time.time()))
    _add_error_handlers(app)
    _add_info_routes(app, served)
    _add_token_routes(app, served)
    _add_generation_routes(app, served)
    # Outermost last: accounting (also counts 413s) > Host / Content-Type > API key > body limit,
    # so a request without the key is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(RequestGuardMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(AccountingMiddleware, metrics=metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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


def _add_info_routes(app: FastAPI, s: _Served) -> None:
    """Health, metrics, version, the model list and the tokenizer's description."""
    engine = s.engine

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        ok = s.scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": engine.name, "queue_length": s.scheduler.waiting, "running": s.scheduler.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(s.metrics.render(), media_type=CONTENT_TYPE)

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
        return {"id": engine.name, "object": "model", "created": s.created, "owned_by": "omnikv", "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        _check_model(engine, model_id)
        return JSONResponse(model_card())

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return JSONResponse(_text_tool(engine, "tokenizer_info")())


def _add_token_routes(app: FastAPI, s: _Served) -> None:
    """/tokenize and /detokenize: on the HTTP side, with the engine's own copy of the tokenizer."""
    engine = s.engine

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = parse_body(TokenizeRequest, await request.body())
        assert isinstance(req, TokenizeRequest)
        _check_model(engine, req.model)
        if req.messages is not None:
            messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
            s.limits.check_chars(sum(len(m.content) for m in messages), "messages")
            ids = await asyncio.to_thread(_text_tool(engine, "tokenize"), messages, add_special_tokens=req.add_generation_prompt)
        else:
            assert req.prompt is not None
            s.limits.check_chars(len(req.prompt), "prompt")
            ids = await asyncio.to_thread(_text_tool(engine, "tokenize"), req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_context, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = parse_body(DetokenizeRequest, await request.body())
        assert isinstance(req, DetokenizeRequest)
        _check_model(engine, req.model)
        check_token_ids(getattr(engine, "vocab_size", None), req.tokens, "tokens")
        text = await asyncio.to_thread(_text_tool(engine, "detokenize"), req.tokens)
        return JSONResponse({"prompt": text})


def _add_generation_routes(app: FastAPI, s: _Served) -> None:
    engine = s.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        assert isinstance(req, ChatCompletionRequest)
        fmt = ChatFormat(engine.name, req.n, token_ids=req.return_tokens_as_token_ids, logprobs=req.logprobs, echo=(req.echo_text(),))
        return await _serve(s, request, req, [(chat_encoder(req, s.limits), None)], fmt)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        assert isinstance(req, CompletionRequest)
        prompts = completion_encoders(req, s.limits, getattr(engine, "vocab_size", None))
        fmt = CompletionFormat(engine.name, req.n, echo=req.echo, token_ids=req.return_tokens_as_token_ids)
        return await _serve(s, request, req, prompts, fmt)


async def _serve(s: _Served, request: Request, req: Any, prompts: list[tuple[Encode, str | None]], fmt: ResponseFormat) -> Response:
    """Queue the request, then answer it as a stream or as one JSON body."""
    _check_model(s.engine, req.model)
    s.limits.check_max_tokens(req.requested_max_tokens(), bool(getattr(req, "echo", False)) and isinstance(req, CompletionRequest))
    job = Job(prepare(s.limits, [encode for encode, _ in prompts], req), asyncio.get_running_loop())
    try:
        s.scheduler.submit(job)
    except QueueFull:
        raise APIError(
            429, f"The server is busy: {s.scheduler.max_queue} requests are already waiting. Retry shortly.", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    first = await _next(job, request, s.scheduler)  # "start": the prompts are tokenized and fit
    if first is None:  # the client left while waiting; nobody reads this
        return Response(status_code=499)
    if req.stream:
        # Wait for the first piece before sending headers, so a failure before any output is
        # still a plain HTTP error (status + JSON) rather than an error inside a 200 stream.
        second = await _next(job, request, s.scheduler)
        if second is None:
            return Response(status_code=499)
        return StreamingResponse(
            sse_stream(job, request, s.scheduler, fmt, second, req.include_usage(), len(prompts)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    while True:
        ev = await _next(job, request, s.scheduler)
        if ev is None:
            return Response(status_code=499)
        if ev[0] == "done":
            results = ev[1]
            if isinstance(fmt, CompletionFormat) and fmt.echo:  # a text prompt echoes as sent, not as its tokens decode
                texts = [t for _, t in prompts for _ in range(req.n)]
                results = [replace(r, prompt_text=t) if t is not None else r for r, t in zip(results, texts)]
            return JSONResponse(fmt.full(results))


async def _next(job: Job, request: Request, scheduler: Scheduler) -> tuple[str, Any] | None:
    """The job's next event (None: the client left); an error event is raised as its APIError."""
    ev = await next_event(job, request, scheduler)
    if ev is not None and ev[0] == "error":
        raise ev[1]
    return ev


def _text_tool(engine: EngineLike, name: str) -> Callable[..., Any]:
    fn = getattr(engine, name, None)
    if fn is None:
        raise APIError(404, f"This server's engine does not offer /{name}.", code="not_supported")
    return fn


def _check_model(engine: EngineLike, model: str | None) -> None:
    if model is not None and model != engine.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.name}'.", param="model", code="model_not_found")
