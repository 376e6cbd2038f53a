"""Run an app with uvicorn: in the foreground (CLI) or in a background thread (tests, notebooks).

Both go through `OmniKVServer`, which adds what uvicorn lacks: on SIGTERM/SIGINT the app's
`begin_shutdown` runs at once (queued requests get 503 JSON, streams end with an error event and
[DONE] instead of being cut), a slow client gets `header_timeout_s` to send its request headers,
and the `omnikv` loggers write next to uvicorn's.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from omnikv.errors import ConfigError, ResourceError

DEFAULT_HEADER_TIMEOUT_S = 10.0
GRACEFUL_SHUTDOWN_S = 5.0  # uvicorn waits this long for open connections, then cuts them


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the `omnikv` loggers (e.g. "request cancelled by its client")."""
    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["omnikv"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (host, port) now, so a port in use is reported before anything slow (loading the model)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use; stop the other server or pick another --port") from None
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a limit on the time between connecting (or the end of the
    previous response) and a complete set of request headers: a client trickling headers
    (slowloris) is disconnected instead of holding a connection forever."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: Any = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()


def make_config(app: object, *, log_level: str = "info", header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, graceful_s: float = GRACEFUL_SHUTDOWN_S) -> uvicorn.Config:
    protocol = type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(
        app, log_level=log_level, log_config=log_config(log_level), lifespan="on", timeout_graceful_shutdown=graceful_s, http=protocol
    )


class OmniKVServer(uvicorn.Server):
    """uvicorn's server that tells the app as soon as shutdown is asked for (see module doc)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
        if begin is not None and not self.should_exit:
            # A signal handler must not take the scheduler's lock: hand the work to a thread.
            threading.Thread(target=begin, name="omnikv-shutdown", daemon=True).start()
        super().handle_exit(sig, frame)


def serve_forever(app: object, host: str, port: int, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM run the app's shutdown; see the module doc)."""
    sock = sock or bind_socket(host, port)
    OmniKVServer(make_config(app, log_level=log_level)).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as srv: httpx.get(srv.url + "/health")`.

    Binds 127.0.0.1 on a free port chosen by the OS (the socket is bound before uvicorn starts, so
    there is no race for the port), waits for startup, and always stops the server on exit.
    """

    def __init__(
        self, app: object, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, graceful_s: float = 2.0
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.header_timeout_s = header_timeout_s
        self.graceful_s = graceful_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        config = make_config(self.app, log_level="warning", header_timeout_s=self.header_timeout_s, graceful_s=self.graceful_s)
        self._server = OmniKVServer(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="omnikv-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ResourceError(f"the server did not start on {self.url} within {self.startup_timeout:.0f} s")
            time.sleep(0.02)
        return self

    def signal_exit(self) -> None:
        """What SIGTERM does to `omnikv serve` (uvicorn only installs signal handlers in the main
        thread): begin the app's shutdown and let uvicorn stop. `stop()` then waits for it."""
        if self._server is not None:
            self._server.handle_exit(15, None)

    def stop(self, timeout: float = 15.0) -> None:
        if self._server is not None:
            self._server.handle_exit(15, None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True  # open streams did not finish in time
                self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
