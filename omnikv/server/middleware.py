"""Pure-ASGI middleware: request guard (Host, Content-Type, trailing slash), body size limit and
read timeout, per-request accounting.

Pure ASGI (not `BaseHTTPMiddleware`) so streamed responses pass through untouched and client
disconnects still reach the endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any, Awaitable, Callable, Iterable

from omnikv.server.api_errors import APIError
from omnikv.server.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Label values for the request counter; anything else is "other" (bounded label cardinality).
KNOWN_ENDPOINTS = (
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/version",
)
# Paths answered without the API key: probes that reveal nothing about the model or its users.
OPEN_PATHS = ("/health", "/version")
MODEL_ENDPOINT = "/v1/models/{id}"  # one label for every /v1/models/<id>

# Host names a loopback server answers to (with any port). A web page that rebinds its own DNS
# name to 127.0.0.1 still sends that name as Host, so checking it defeats DNS rebinding.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_BODY_METHODS = ("POST", "PUT", "PATCH")


async def _send_error(send: Send, err: APIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}


def _host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'LocalHost' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuardMiddleware:
    """Refuse what a browser page could send to a loopback server, and normalize paths.

    - A `Host` header outside `allowed_hosts` gets 400 (DNS rebinding: the page's own name).
    - A POST whose Content-Type is not application/json gets 415: browsers send text/plain and
      form types cross-origin without a CORS preflight, JSON needs one (which gets no CORS
      headers here, so it fails).
    - A trailing slash is ignored (`/v1/models/` = `/v1/models`) instead of answered with a 307.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.strip().lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.allowed is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                await _send_error(send, APIError(400, f"Unexpected Host header {host!r}; this server answers to {', '.join(sorted(self.allowed))} (--allowed-host).", code="invalid_host"))
                return
        if scope["method"] in _BODY_METHODS:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                await _send_error(send, APIError(415, "Send the request body as JSON with 'Content-Type: application/json'.", code="unsupported_media_type"))
                return
        path = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if "raw_path" in scope and scope["raw_path"]:
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class AuthMiddleware:
    """With an API key set, every path but OPEN_PATHS needs `Authorization: Bearer <key>`: 401
    before the request body is read (an unauthenticated client cannot make the server buffer
    megabytes, nor learn the body limit)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope.get("path", "") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        # compare_digest on bytes: constant time in the token's content (not in its length).
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            err = APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
            await _send_error(send, err)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reject request bodies over `max_bytes` with 413, or not complete within `timeout_s` with
    408, before the endpoint sees them.

    The body is read here (at most `max_bytes` + one chunk) and replayed to the endpoint, so a
    chunked upload without Content-Length is bounded too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"Request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes).",
            code="request_too_large",
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, APIError(400, "Invalid Content-Length header.", code="invalid_header"))
                    return
                if declared > self.max_bytes:
                    await _send_error(send, too_large)
                    return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                await _send_error(send, APIError(408, f"The request body did not arrive within {self.timeout_s:g} s.", code="request_timeout"))
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: wait for http.disconnect as usual

        await self.app(scope, replay, send)


class AccountingMiddleware:
    """Count requests by endpoint and status and time them to the last byte of the response."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/") or "/"
        endpoint = path if path in KNOWN_ENDPOINTS else MODEL_ENDPOINT if path.startswith("/v1/models/") else "other"
        status = 500
        start = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
