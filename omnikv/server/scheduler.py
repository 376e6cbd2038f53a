"""Bounded FIFO request queue served by one worker thread.

Requests are answered strictly in arrival order by a single thread that owns the engine (the model,
its tokenizer and the KV method are not thread-safe, and one long-context request already uses the
whole device). Batching is not done: `omnikv.generation.generate` decodes one sequence, so the
worker runs one request at a time.

Events flow back to the asyncio side through `Job.events` (an `asyncio.Queue` fed with
`call_soon_threadsafe`): ("start", GenRequest), ("text", str)*, then ("done", EngineResult) or
("error", APIError).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from omnikv.server.api_errors import APIError, from_exception
from omnikv.server.protocol import EngineLike, EngineResult, GenRequest
from omnikv.server.stops import StopMatcher

log = logging.getLogger("omnikv.server")


class JobCancelled(Exception):
    """Raised inside `on_token` to abort a generation whose client went away."""


class QueueFull(Exception):
    """The waiting queue already holds `max_queue` requests."""


class Job:
    """One request in flight. `prepare` runs on the worker thread (tokenization, length checks)."""

    def __init__(self, prepare: Callable[[EngineLike], GenRequest], loop: asyncio.AbstractEventLoop) -> None:
        self.prepare = prepare
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.enqueued_at = time.monotonic()
        self.last_disconnect_check = self.enqueued_at  # owned by the HTTP side
        self._loop = loop

    def emit(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        max_queue: int,
        on_start: Callable[[float], None] | None = None,
        on_result: Callable[[EngineResult], None] | None = None,
    ) -> None:
        """on_start(seconds waited) and on_result(result) are called on the worker thread."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._on_start = on_start
        self._on_result = on_result
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- state, read by /health and /metrics ------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return 0 if self._running is None else 1

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="omnikv-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse waiting requests, abort the running one at its next token, join the worker."""
        with self._cv:
            self._closing = True
            dropped = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cv.notify_all()
        for job in dropped:
            job.emit("error", APIError(503, "The server is shutting down.", code="shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing or not self.alive:
                raise APIError(503, "The server is shutting down or its engine stopped.", code="unavailable")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, else abort it at its next token."""
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    # -- worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                self._run(job)
            except BaseException:  # never let one request kill the worker
                log.exception("worker failed outside a request")
            finally:
                with self._cv:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if self._on_start is not None:
            self._on_start(time.monotonic() - job.enqueued_at)
        try:
            request = job.prepare(self.engine)
            job.emit("start", request)
            matcher = StopMatcher(request.stop)
            parts: list[str] = []
            fed = False

            def on_token(piece: str) -> None:
                nonlocal fed
                if job.cancelled.is_set():
                    raise JobCancelled()
                fed = True
                out = matcher.feed(piece)
                if out:
                    parts.append(out)
                    job.emit("text", out)

            result = self.engine.generate(request, on_token)
            if not fed and result.text:  # an engine that does not stream: release its text at once
                on_token(result.text)
            tail = matcher.flush()
            if tail:
                parts.append(tail)
                job.emit("text", tail)
            # The streamed text is authoritative: it already has stop strings removed.
            result = replace(result, text="".join(parts), finish_reason="stop" if matcher.stopped else result.finish_reason)
            if self._on_result is not None:
                self._on_result(result)
            job.emit("done", result)
        except JobCancelled:
            log.info("request cancelled by its client")
        except Exception as exc:
            err = from_exception(exc)
            if err.status >= 500:
                log.exception("request failed")
            job.emit("error", err)
