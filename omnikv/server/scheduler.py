"""Bounded FIFO request queue served by one worker thread.

Requests are answered strictly in arrival order by a single thread that owns the engine (the model,
its tokenizer and the KV method are not thread-safe, and one long-context request already uses the
whole device). When the engine offers `generate_batch` (`max_batch_size` > 1), the requests waiting right
behind the first one that share its `batch_key` (same sampling settings) are decoded together with
it; otherwise one request runs at a time.

A job holds one or more prompts (a completion request may send several), each with `n` choices;
choice index = prompt index x n + i. Events flow back to the asyncio side through `Job.events` (an
`asyncio.Queue` fed with `call_soon_threadsafe`): ("start", [GenRequest]), then ("text", (index,
str, logprobs)) and ("finish", (index, EngineResult, logprobs)) per choice, then ("done",
[EngineResult] by index) or ("error", APIError). `logprobs` are the output tokens' entries not yet
sent (streamed logprobs), a tuple, empty unless the engine hands them to its `TokenSink`.

Shutdown (`begin_shutdown`): waiting requests are answered 503 at once; running ones get a grace
period to finish, then stop at their next token with a 503 error (a stream's last event).
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
from omnikv.server.protocol import EngineLike, EngineResult, GenRequest, LogprobEntry
from omnikv.decoding.stops import StopMatcher

log = logging.getLogger("omnikv.server")


class JobCancelled(Exception):
    """Raised inside `on_token` to abort a generation whose client went away."""


class QueueFull(Exception):
    """The waiting queue already holds `max_queue` requests."""


# Seconds a client refused during shutdown is told to wait: a restarted server takes about this long.
SHUTDOWN_RETRY_AFTER_S = 10


def _shutting_down() -> APIError:
    return APIError(
        503, "The server is shutting down; retry on another instance or later.", code="shutting_down",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
    )


class Job:
    """One request in flight. `prepare` runs on the worker thread (tokenization, length checks)."""

    def __init__(self, prepare: Callable[[EngineLike], list[GenRequest]], loop: asyncio.AbstractEventLoop) -> None:
        self.prepare = prepare
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stopped_by_shutdown = False  # cancelled because the server stops, not by its client
        self.enqueued_at = time.monotonic()
        self.last_disconnect_check = self.enqueued_at  # owned by the HTTP side
        self.requests: list[GenRequest] | None = None  # set on the worker by `prepare`
        self._loop = loop

    @property
    def request(self) -> GenRequest | None:
        """The single request of a one-prompt job (what batching looks at); None otherwise."""
        return self.requests[0] if self.requests is not None and len(self.requests) == 1 else None

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
            job.emit("error", _shutting_down())
        if self._thread is not None:
            self._thread.join(timeout)

    def begin_shutdown(self, drain_s: float = 3.0) -> None:
        """The process got SIGTERM/SIGINT: answer waiting requests with 503 now, give running ones
        `drain_s` to finish, then stop them with a 503 error event. Safe from any thread."""
        with self._cv:
            self._closing = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for job in dropped:
            job.emit("error", _shutting_down())

        def expire() -> None:
            with self._cv:
                running = list(self._running)
            for job in running:
                job.stopped_by_shutdown = True
                job.cancelled.set()

        timer = threading.Timer(drain_s, expire)
        timer.daemon = True
        timer.start()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise _shutting_down()
            if not self.alive:
                raise APIError(503, "The server's engine stopped; see the server log.", code="unavailable")
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
        if job.requests is not None:
            return True
        if self._on_start is not None:
            self._on_start(time.monotonic() - job.enqueued_at)
        try:
            job.requests = job.prepare(self.engine)
        except Exception as exc:
            job.emit("error", self._error(exc))
            return False
        job.emit("start", job.requests)
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
        key = batch_key(head.request) if limit > 1 and batch_key is not None and _batchable(head) else None
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
            if not _batchable(job) or batch_key(job.request) != key:
                with self._cv:
                    self._running.remove(job)
                    self._waiting.appendleft(job)
                break
            batch.append(job)
        return batch

    def _run_one(self, job: Job) -> None:
        assert job.requests is not None
        results: list[EngineResult] = []
        try:
            for p, request in enumerate(job.requests):
                outs = [_Output(job, p * request.n + i, request.stop) for i in range(request.n)]
                for i, (out, result) in enumerate(zip(outs, self._choices(request, outs))):
                    results.append(self._finish(out, result, first_of_prompt=i == 0))
        except JobCancelled:
            if job.stopped_by_shutdown:
                job.emit("error", _shutting_down())
            else:
                log.info("request cancelled by its client")
            return
        except Exception as exc:
            job.emit("error", self._error(exc))
            return
        job.emit("done", results)

    def _choices(self, request: GenRequest, outs: list["_Output"]) -> list[EngineResult]:
        if request.n == 1:
            return [self.engine.generate(request, outs[0].on_token)]
        fork = getattr(self.engine, "generate_choices", None)
        if fork is not None:
            return list(fork(request, [o.on_token for o in outs]))
        # An engine that cannot fork its cache: one generation (and prefill) per choice.
        return [self.engine.generate(replace(request, n=1, seed=request.choice_seed(i)), o.on_token) for i, o in enumerate(outs)]

    def _run_batch(self, jobs: list[Job]) -> None:
        outs = [_Output(j, 0, j.request.stop) for j in jobs]  # type: ignore[union-attr]
        try:
            results = self.engine.generate_batch([j.request for j in jobs], [o.on_token for o in outs])  # type: ignore[attr-defined]
        except Exception as exc:
            err = self._error(exc)
            for j in jobs:
                j.emit("error", err)
            return
        for out, result in zip(outs, results):
            if isinstance(result, JobCancelled):
                if out.job.stopped_by_shutdown:
                    out.job.emit("error", _shutting_down())
                else:
                    log.info("request cancelled by its client")
            elif isinstance(result, BaseException):
                out.job.emit("error", self._error(result))
            else:
                out.job.emit("done", [self._finish(out, result, first_of_prompt=True)])

    def _finish(self, out: "_Output", result: EngineResult, *, first_of_prompt: bool) -> EngineResult:
        result = out.finish(result)
        if self._on_result is not None:  # a prompt's tokens count once, however many choices
            self._on_result(result if first_of_prompt else replace(result, prompt_tokens=0))
        out.job.emit("finish", (out.index, result, out.take_logprobs()))
        return result

    @staticmethod
    def _error(exc: BaseException) -> APIError:
        err = from_exception(exc)
        if err.status >= 500:
            log.error("request failed", exc_info=exc)
        return err


def _batchable(job: Job) -> bool:
    return job.request is not None and job.request.plain


class _Output:
    """One choice's text on its way out: stop strings applied, pieces forwarded as events.

    `on_token` is the engine's `TokenSink`: callable with text pieces, and `on_token.logprob`
    takes the output tokens' logprob entries, which leave with the next text piece (or with the
    finish event): concatenated over a stream they are the non-streamed list."""

    def __init__(self, job: Job, index: int, stop: tuple[str, ...]) -> None:
        self.job = job
        self.index = index
        self.matcher = StopMatcher(stop)
        self.parts: list[str] = []
        self.fed = False
        self.logprobs: list[LogprobEntry] = []  # not sent yet
        self.on_token = _Sink(self)

    def _piece(self, piece: str) -> None:
        if self.job.cancelled.is_set():
            raise JobCancelled()
        if not piece:  # a liveness probe (e.g. between prefill chunks)
            return
        self.fed = True
        self._emit(self.matcher.feed(piece))

    def take_logprobs(self) -> tuple[LogprobEntry, ...]:
        out, self.logprobs = tuple(self.logprobs), []
        return out

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.job.emit("text", (self.index, text, self.take_logprobs()))

    def finish(self, result: EngineResult) -> EngineResult:
        if not self.fed and result.text:  # an engine that does not stream: release its text at once
            self._emit(self.matcher.feed(result.text))
        self._emit(self.matcher.flush())
        # The streamed text is authoritative: it already has stop strings removed.
        return replace(result, text="".join(self.parts), finish_reason="stop" if self.matcher.stopped else result.finish_reason)


class _Sink:
    """`_Output.on_token` as the engine sees it (a `TokenSink`)."""

    def __init__(self, out: _Output) -> None:
        self._out = out

    def __call__(self, piece: str) -> None:
        self._out._piece(piece)

    def logprob(self, entry: LogprobEntry) -> None:
        self._out.logprobs.append(entry)
