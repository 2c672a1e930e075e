"""Running the app with uvicorn: bind first (a taken port is a one-line error), then serve.

``serve(app, host, port)`` blocks (SIGINT/SIGTERM stop accepting, finish in-flight requests, exit);
``BackgroundServer`` runs the same server on a thread, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Optional

import uvicorn

logger = logging.getLogger(__name__)

__all__ = ["bind_socket", "serve", "BackgroundServer"]


def bind_socket(host: str = "127.0.0.1", port: int = 8000, reuse_port: bool = False,
                listen: bool = True) -> socket.socket:
    """A listening TCP socket; ``OSError`` with a one-line reason if the address can't be used.
    ``reuse_port``: several processes bind the same port and the kernel spreads new connections over
    their sockets (``SO_REUSEPORT``); ``listen=False`` only reserves the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not listen:
        return sock
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, log_level: str, graceful_timeout: float) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=graceful_timeout,
                          lifespan="on", server_header=False)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0, sock: Optional[socket.socket] = None) -> None:
    """Serve ``app`` until interrupted. Binding happens before anything else starts."""
    sock = sock or bind_socket(host, port)
    server = uvicorn.Server(_uvicorn_config(app, log_level, graceful_timeout))
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
