"""Running the app with uvicorn: bind first (a taken port is a one-line error), then serve.

``serve(app, host, port)`` blocks (SIGINT/SIGTERM stop accepting, finish in-flight requests, exit);
``BackgroundServer`` runs the same server on a thread, for tests and benchmarks.

A port is taken by one server only. A single-process server listens at once (``SO_REUSEADDR``, as every
server does, so that a restart is not refused by the last connections' TIME_WAIT). ``--workers`` servers
(:mod:`.workers`) listen with one ``SO_REUSEPORT`` socket per worker, and Linux lets any process of the same
user join such a port; so :func:`reserve_port` first check-binds the port without ``SO_REUSEPORT`` (refused
while any server listens on it, or while another ``--workers`` parent holds it), then holds it for the
server's life with a socket that sets ``SO_REUSEPORT`` but not ``SO_REUSEADDR``: the workers can join it,
while it refuses every later check-bind (and a single-process server's bind) even before the workers listen.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn

logger = logging.getLogger(__name__)

__all__ = ["bind_socket", "reserve_port", "serve", "BackgroundServer"]


def bind_socket(host: str = "127.0.0.1", port: int = 8000, reuse_port: bool = False,
                listen: bool = True) -> socket.socket:
    """A listening TCP socket; ``OSError`` with a one-line reason if the address can't be used.
    ``reuse_port``: several processes bind the same port and the kernel spreads new connections over
    their sockets (``SO_REUSEPORT``); ``listen=False`` only binds."""
    sock = _bound(host, port, reuse_addr=True, reuse_port=reuse_port)
    if not listen:
        return sock
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the ``SO_REUSEPORT`` workers of one server (a bound socket that never listens);
    ``OSError`` naming the address when another server, of either kind, holds it or listens on it."""
    if port:
        _bound(host, port, reuse_addr=True, reuse_port=False).close()  # the check-bind
    try:
        return _bound(host, port, reuse_addr=False, reuse_port=True)
    except OSError:
        # The check passed, so only TIME_WAIT connections of an earlier single-process server are left on the
        # port (they refuse a socket without SO_REUSEADDR for a minute): hold it as the workers will.
        logger.info("port %d has connections in TIME_WAIT; reserving it with SO_REUSEADDR", port)
        return _bound(host, port, reuse_addr=True, reuse_port=True)


def _bound(host: str, port: int, reuse_addr: bool, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuse_addr:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _uvicorn_config(app, log_level: str, graceful_timeout: float) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=graceful_timeout,
                          lifespan="on", server_header=False)


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_started()`` once the app's start-up (the warm-up check) has passed
    and the server accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Optional[Callable[[], None]] = None) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)  # a failed app start-up exits with status 3 (uvicorn's)
        if self.started and self.on_started is not None:
            self.on_started()


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0, sock: Optional[socket.socket] = None,
          on_started: Optional[Callable[[], None]] = None) -> None:
    """Serve ``app`` until interrupted. Binding happens before anything else starts; ``on_started()`` is
    called once the app has started (warm-up passed). A failed start-up exits with status 3."""
    sock = sock or bind_socket(host, port)
    server = _Server(_uvicorn_config(app, log_level, graceful_timeout), on_started)
    # uvicorn finishes in-flight requests on SIGINT/SIGTERM, then re-raises the signal to the handler
    # it found; with this one in place, a graceful stop returns normally (exit status 0).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise RuntimeError("server failed to start (see the log above)")


def _stopped(signum, frame) -> None:
    logger.info("stopped by signal %d", signum)


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")`` on a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(app, log_level, graceful_timeout=10.0))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("embedding server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self if self.thread.is_alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
