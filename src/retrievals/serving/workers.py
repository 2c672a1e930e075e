"""``retrievals serve --workers N``: N server processes on one port, each with its own model and batcher.

The parent reserves the port (:func:`.server.reserve_port`: a port taken by any other server, with or without
``--workers``, fails before any model loads) and starts N spawned processes; each loads the model, passes the
warm-up check and only then listens on the port with its own ``SO_REUSEPORT`` socket and reports ready; the
kernel spreads new connections evenly over the listening workers (by a hash of the client's address and port).
One shared listening socket would leave the split to whichever worker's event loop accepts first: with
keep-alive clients we measured one worker taking most connections and the other idling in some runs. The
parent loads no model and serves nothing: it waits. SIGTERM/SIGINT go to every worker, which stop accepting,
finish their in-flight requests and exit; the parent exits 0 when all have. A worker that dies after it was
ready is restarted; one that exits before it was ready (a model that does not load, or fails the warm-up
check) stops the whole server, every worker would fail the same way: :func:`serve_workers` raises
:class:`WorkerStartError` with the worker's exit status (3 for a failed warm-up, as a single-process server
exits). A worker whose parent is gone stops.

Each worker's torch uses ``cpu_count // N`` threads unless ``OMP_NUM_THREADS`` says otherwise. ``/metrics``
counts per worker (the one that answers the scrape); ``/info`` names the worker's ``pid``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = ["serve_workers", "WorkerStartError"]


class WorkerStartError(RuntimeError):
    """A worker exited before it was ready; ``status`` is its exit status."""

    def __init__(self, slot: int, status: int) -> None:
        super().__init__(f"worker {slot} failed to start (exit status {status}); its error is above")
        self.status = status


def _worker(make_app: Callable[[], object], address: Tuple[str, int], ready, threads: int, log_level: str,
            graceful_timeout: float) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_stop_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    from .server import bind_socket, serve

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    try:
        app = make_app()
    except (FileNotFoundError, ValueError, OSError, TypeError) as e:  # as the command line reports them
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sock = bind_socket(*address, reuse_port=True, listen=False)  # uvicorn listens once the warm-up passed
    serve(app, sock=sock, log_level=log_level, graceful_timeout=graceful_timeout, on_started=ready.set)


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this worker once its parent is gone (killed with SIGKILL, say): no orphan keeps the port."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


class _Supervisor:
    def __init__(self, make_app, address, workers: int, log_level: str, graceful_timeout: float) -> None:
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process that imported torch
        self.make_app, self.address, self.log_level = make_app, address, log_level
        self.graceful_timeout = graceful_timeout
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.slots: List[Optional[tuple]] = [None] * workers
        self.stopping = False

    def start(self, slot: int) -> None:
        ready = self.ctx.Event()
        process = self.ctx.Process(target=_worker, name=f"retrievals-worker-{slot}", daemon=False,
                                   args=(self.make_app, self.address, ready, self.threads, self.log_level,
                                         self.graceful_timeout))
        process.start()
        self.slots[slot] = (process, ready)
        logger.info("worker %d started (pid %d, %d torch threads)", slot, process.pid, self.threads)

    def stop(self, signum=None, frame=None) -> None:
        if not self.stopping:
            logger.info("stopping %d workers (signal %s): each finishes its in-flight requests", len(self.slots), signum)
        self.stopping = True
        for process, _ in filter(None, self.slots):
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def watch(self) -> int:
        """Restart workers that die after they were ready; returns the exit status, or raises
        :class:`WorkerStartError` for a worker that exited before it was ready."""
        while not self.stopping:
            time.sleep(0.2)
            for slot, (process, ready) in enumerate(self.slots):
                if process.is_alive() or self.stopping:
                    continue
                if not ready.is_set():
                    logger.error("worker %d exited with %s before it was ready; stopping", slot, process.exitcode)
                    self.stop()
                    self.join()
                    raise WorkerStartError(slot, process.exitcode if process.exitcode and process.exitcode > 0 else 1)
                logger.warning("worker %d (pid %d) exited with %s; restarting it", slot, process.pid, process.exitcode)
                self.start(slot)
        return self.join()

    def join(self) -> int:
        deadline = time.monotonic() + self.graceful_timeout + 10
        status = 0
        for process, _ in filter(None, self.slots):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker pid %d did not stop within the graceful timeout; killing it", process.pid)
                process.kill()
                process.join()
                status = 1
        return status


def serve_workers(make_app: Callable[[], object], host: str, port: int, workers: int, log_level: str = "info",
                  graceful_timeout: float = 30.0) -> int:
    """Serve ``make_app()`` (a picklable callable that loads the model and builds the app) from ``workers``
    processes listening on ``host:port``; blocks until SIGTERM/SIGINT, returns the exit status.
    :class:`WorkerStartError` if a worker exits before it is ready."""
    from .server import reserve_port

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    sock = reserve_port(host, port)  # fails fast if any server holds the port
    supervisor = _Supervisor(make_app, sock.getsockname()[:2], workers, log_level, graceful_timeout)
    previous = {sig: signal.signal(sig, supervisor.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in range(workers):
            supervisor.start(slot)
        return supervisor.watch()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
