"""Bounded FIFO request queue served by one worker thread.

Requests are answered strictly in arrival order by a single thread that owns the engine (the model,
its tokenizer and the KV method are not thread-safe, and one long-context request already uses the
whole device). When the engine offers `generate_batch` (`max_batch_size` > 1), the requests waiting right
behind the first one that share its `batch_key` (same sampling settings) are decoded together with
it; otherwise one request runs at a time.

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
from omnikv.stops import StopMatcher

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
        self.request: GenRequest | None = None  # set on the worker by `prepare`
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
        self._running: list[Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- state, read by /health and /metrics ------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

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
        """Refuse waiting requests, abort running ones at their next token, join the worker."""
        with self._cv:
            self._closing = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job.cancelled.set()
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
                self._running = [job]
            try:
                batch = self._collect(job)
                if len(batch) == 1:
                    self._run_one(batch[0])
                elif batch:
                    self._run_batch(batch)
            except BaseException:  # never let one request kill the worker
                log.exception("worker failed outside a request")
            finally:
                with self._cv:
                    self._running = []

    def _prepared(self, job: Job) -> bool:
        """Tokenize and check `job` (once); False if it was cancelled or refused (error sent)."""
        if job.cancelled.is_set():
            return False
        if job.request is not None:
            return True
        if self._on_start is not None:
            self._on_start(time.monotonic() - job.enqueued_at)
        try:
            job.request = job.prepare(self.engine)
        except Exception as exc:
            job.emit("error", self._error(exc))
            return False
        job.emit("start", job.request)
        return True

    def _collect(self, head: Job) -> list[Job]:
        """`head`, plus the requests right behind it that the engine can decode in the same batch.

        Collection stops at the first request that cannot join, which goes back to the front of
        the queue: requests are still started in arrival order.
        """
        if not self._prepared(head):
            return []
        batch = [head]
        limit = int(getattr(self.engine, "max_batch_size", 1) or 1)
        batch_key = getattr(self.engine, "batch_key", None)
        key = batch_key(head.request) if limit > 1 and batch_key is not None else None
        if key is None:
            return batch
        while len(batch) < limit:
            with self._cv:
                if not self._waiting or self._closing:
                    break
                job = self._waiting.popleft()
                self._running.append(job)
            if not self._prepared(job):
                with self._cv:
                    self._running.remove(job)
                continue
            if batch_key(job.request) != key:
                with self._cv:
                    self._running.remove(job)
                    self._waiting.appendleft(job)
                break
            batch.append(job)
        return batch

    def _run_one(self, job: Job) -> None:
        out = _Output(job)
        try:
            assert job.request is not None
            result = self.engine.generate(job.request, out.on_token)
        except JobCancelled:
            log.info("request cancelled by its client")
            return
        except Exception as exc:
            job.emit("error", self._error(exc))
            return
        self._finish(out, result)

    def _run_batch(self, jobs: list[Job]) -> None:
        outs = [_Output(j) for j in jobs]
        try:
            results = self.engine.generate_batch([j.request for j in jobs], [o.on_token for o in outs])  # type: ignore[attr-defined]
        except Exception as exc:
            err = self._error(exc)
            for j in jobs:
                j.emit("error", err)
            return
        for out, result in zip(outs, results):
            if isinstance(result, JobCancelled):
                log.info("request cancelled by its client")
            elif isinstance(result, BaseException):
                out.job.emit("error", self._error(result))
            else:
                self._finish(out, result)

    def _finish(self, out: "_Output", result: EngineResult) -> None:
        result = out.finish(result)
        if self._on_result is not None:
            self._on_result(result)
        out.job.emit("done", result)

    @staticmethod
    def _error(exc: BaseException) -> APIError:
        err = from_exception(exc)
        if err.status >= 500:
            log.error("request failed", exc_info=exc)
        return err


class _Output:
    """One job's text on its way out: stop strings applied, pieces forwarded as events."""

    def __init__(self, job: Job) -> None:
        assert job.request is not None
        self.job = job
        self.matcher = StopMatcher(job.request.stop)
        self.parts: list[str] = []
        self.fed = False

    def on_token(self, piece: str) -> None:
        if self.job.cancelled.is_set():
            raise JobCancelled()
        self.fed = True
        self._emit(self.matcher.feed(piece))

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.job.emit("text", text)

    def finish(self, result: EngineResult) -> EngineResult:
        if not self.fed and result.text:  # an engine that does not stream: release its text at once
            self._emit(self.matcher.feed(result.text))
        self._emit(self.matcher.flush())
        # The streamed text is authoritative: it already has stop strings removed.
        return replace(result, text="".join(self.parts), finish_reason="stop" if self.matcher.stopped else result.finish_reason)
