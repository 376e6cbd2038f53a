"""Waiting on a job's events from the asyncio side, and turning them into server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from starlette.requests import Request

from omnikv.server.formats import ResponseFormat
from omnikv.server.protocol import EngineResult
from omnikv.server.scheduler import Job, Scheduler

# How often a waiting handler checks whether its client is still connected.
_DISCONNECT_POLL_S = 0.25


async def next_event(job: Job, request: Request, scheduler: Scheduler) -> tuple[str, Any] | None:
    """Next event of `job`; None (and the job cancelled) once the client has disconnected.

    The disconnect check runs at least every `_DISCONNECT_POLL_S` even while events keep coming, as
    some ASGI servers never fail a send to a closed connection.
    """
    while True:
        now = time.monotonic()
        if now - job.last_disconnect_check >= _DISCONNECT_POLL_S:
            job.last_disconnect_check = now
            if await request.is_disconnected():
                scheduler.cancel(job)
                return None
        try:
            return await asyncio.wait_for(job.events.get(), _DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


async def sse_stream(
    job: Job,
    request: Request,
    scheduler: Scheduler,
    fmt: ResponseFormat,
    first: tuple[str, Any],
    include_usage: bool,
    prompts: int,
) -> AsyncIterator[bytes]:
    """SSE chunks of a job (`prompts` prompts, `fmt.n` choices each) from its first event after "start"."""
    finished = False
    pending: tuple[str, Any] | None = first
    try:
        for chunk in fmt.stream_start(prompts):
            yield _sse_line(chunk, include_usage)
        while True:
            ev, pending = (pending, None) if pending is not None else (await next_event(job, request, scheduler), None)
            if ev is None:
                return
            kind, value = ev
            if kind == "text":
                yield _sse_line(fmt.stream_text(*value), include_usage)
            elif kind == "finish":
                index, result, logprobs = value
                yield _sse_line(fmt.stream_end(index, result.finish_reason, logprobs), include_usage)
            elif kind == "error":
                yield b"data: " + json.dumps(value.body()).encode() + b"\n\n"
                finished = True
                break
            elif kind == "done":
                results: list[EngineResult] = value
                if include_usage:
                    final = fmt.stream_usage(results)
                    yield b"data: " + json.dumps(final).encode() + b"\n\n"
                finished = True
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # client disconnected or the response was cancelled: free the engine
            scheduler.cancel(job)


def _sse_line(chunk: dict[str, Any], include_usage: bool) -> bytes:
    if include_usage:
        chunk["usage"] = None  # per OpenAI: every chunk but the last carries "usage": null
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"
