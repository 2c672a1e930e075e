"""Processes started by tests: each in its own process group, stopped with all its children (server workers,
torchrun ranks, Ray daemons) when the ``with`` block ends, however it ends (a failed assertion included).

    with running([RETRIEVALS, "serve", model_dir, "--workers", "2"], stdout=log) as proc:
        ...                                  # proc is a subprocess.Popen
    result = run([RETRIEVALS, "serve", ...], timeout=60)   # subprocess.run's result; the group goes on a timeout
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import time
from typing import Iterator, List, Sequence


def group_pids(pgid: int) -> List[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            found.append(int(entry))
    return found


def stop_group(proc: subprocess.Popen, grace: float = 10.0, first: int = signal.SIGTERM) -> None:
    """Send ``first`` (SIGTERM) to the process group of ``proc`` (started with ``start_new_session=True``),
    SIGKILL what is left after ``grace`` seconds, and reap ``proc``."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that it no longer counts
            if not group_pids(proc.pid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(args: Sequence[str], grace: float = 10.0, first: int = signal.SIGTERM,
            **popen_kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(args, **popen_kwargs)`` in a new session; its whole group is stopped on exit
    (:func:`stop_group`), however the block ends."""
    proc = subprocess.Popen(list(args), start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        stop_group(proc, grace, first)


def run(args: Sequence[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout)`` (``popen_kwargs`` may replace
    those), except that a timeout (which raises ``subprocess.TimeoutExpired``) stops the whole process group,
    not only ``args[0]``."""
    popen_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_kwargs}
    with _one_torchrun_at_a_time(args), running(args, **popen_kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


@contextlib.contextmanager
def _one_torchrun_at_a_time(args: Sequence[str]) -> Iterator[None]:
    """torchrun launches of the two xdist workers take turns (a file lock): two ``--standalone`` launchers
    started together both hung once in a full run (their ranks' ports are chosen by bind-and-close)."""
    if "torch.distributed.run" not in args:
        yield
        return
    with _taking_turns("retrievals-tests-torchrun.lock"):
        yield


def one_ray_at_a_time():
    """Tests that start Ray take turns across the xdist workers (a file lock): the Ray tests count the Ray
    processes alive after a job, and another test's cluster would be counted (test_two_actors_equal_one_process
    failed so in a clean-clone run once a synthesis test started Ray on the other worker)."""
    return _taking_turns("retrievals-tests-ray.lock")


@contextlib.contextmanager
def _taking_turns(name: str) -> Iterator[None]:
    """An exclusive lock on ``/tmp/<name>`` for the block: the xdist workers' processes take turns."""
    import fcntl

    with open(os.path.join("/tmp", name), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _gloo_rank(rank: int, port: int, world: int, fn, args) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
        del store
        gc.collect()  # gloo's objects freed now: left to interpreter exit, 11 of 80 spawns under load aborted there


def spawn_gloo(fn, nprocs: int, *args) -> None:
    """``mp.spawn`` of ``fn(rank, *args)`` on ``nprocs`` gloo ranks, rendezvous at a TCP store this process
    binds first (port 0, held until the ranks are done): no port chosen by bind-and-close, which a parallel
    test could take before the ranks bind it (a rank then aborts)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, nprocs + 1, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_gloo_rank, args=(store.port, nprocs, fn, args), nprocs=nprocs, join=True)
    finally:
        del store
