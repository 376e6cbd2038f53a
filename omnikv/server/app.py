"""FastAPI app factory for the OpenAI-compatible API.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Every error is OpenAI error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from omnikv.server.api_errors import APIError
from omnikv.server.metrics import CONTENT_TYPE, ServerMetrics
from omnikv.server.middleware import AccountingMiddleware, BodyLimitMiddleware
from omnikv.server.formats import ChatFormat, CompletionFormat, ResponseFormat
from omnikv.server.protocol import ChatMessage, EngineLike, GenRequest
from omnikv.server.scheduler import Job, QueueFull, Scheduler
from omnikv.server.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from omnikv.server.streaming import next_event, sse_stream

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
_FALLBACK_MAX_TOKENS_LIMIT = 4096  # when the model does not declare its context length


def create_app(
    engine: EngineLike,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """Build the app around `engine`; its worker thread runs while the app's lifespan is active.

    max_queue: requests allowed to wait while one runs; more are refused with 429 at once.
    max_body_bytes: larger request bodies get 413.
    max_prompt_tokens: longer prompts get 400 (the model's own context length always applies).
    max_tokens_limit: largest accepted `max_tokens` (default: the model's context length).
    default_max_tokens: completion length when a request gives no `max_tokens`.
    """
    for name, value in (("max_queue", max_queue), ("max_body_bytes", max_body_bytes), ("default_max_tokens", default_max_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_tokens_limit is None:
        max_tokens_limit = engine.max_context or _FALLBACK_MAX_TOKENS_LIMIT
    limits = _Limits(engine.max_context, max_prompt_tokens, max_tokens_limit, default_max_tokens)

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
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
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
    @app.get("/health")
    async def health() -> Response:
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": engine.name, "queue_length": scheduler.waiting, "running": scheduler.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_auth(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "omnikv"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        check_auth(request)
        _check_model(engine, model_id)
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(ChatCompletionRequest, await request.body())
        assert isinstance(req, ChatCompletionRequest)
        messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        return await _serve(request, req, lambda e: e.encode_chat(messages), ChatFormat(engine.name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(CompletionRequest, await request.body())
        assert isinstance(req, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
            encode: Callable[[EngineLike], list[int]] = lambda e: ids
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            encode = lambda e: e.encode_prompt(text)  # noqa: E731
        return await _serve(request, req, encode, CompletionFormat(engine.name))

    async def _serve(request: Request, req: Any, encode: Callable[[EngineLike], list[int]], fmt: ResponseFormat) -> Response:
        _check_model(engine, req.model)
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_limit:
            raise APIError(
                400, f"Invalid value for 'max_tokens': {max_tokens}; it must be between 1 and {limits.max_tokens_limit}.", param="max_tokens", code="invalid_value"
            )
        job = Job(_prepare(limits, encode, req, max_tokens), asyncio.get_running_loop())
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
                sse_stream(job, request, scheduler, fmt, second, req.include_usage()),
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
                return JSONResponse(fmt.full(ev[1]))

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(AccountingMiddleware, metrics=metrics)  # outermost: also counts 413s
    return app


class _Limits:
    def __init__(self, max_context: int | None, max_prompt_tokens: int | None, max_tokens_limit: int, default_max_tokens: int) -> None:
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens


def _check_model(engine: EngineLike, model: str | None) -> None:
    if model is not None and model != engine.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.name}'.", param="model", code="model_not_found")


def _prepare(limits: _Limits, encode: Callable[[EngineLike], list[int]], req: Any, max_tokens: int | None) -> Callable[[EngineLike], GenRequest]:
    """Build the worker-side step: tokenize (the tokenizer belongs to the worker thread) and check lengths."""

    def prepare(engine: EngineLike) -> GenRequest:
        ids = encode(engine)
        n = len(ids)
        if n == 0:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
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
        # top_p = 0 keeps only the most likely token: the same as greedy decoding.
        temperature = 0.0 if req.top_p == 0 else req.temperature
        top_p = 1.0 if req.top_p == 0 else req.top_p
        return GenRequest(ids, budget, temperature, top_p, req.seed, req.stop_tuple())

    return prepare
