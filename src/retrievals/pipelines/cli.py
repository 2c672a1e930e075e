"""The one command-line wrapper the pipelines share: parse dataclass flags, run, report errors; and the end
of a torchrun worker (``leave_process_group``)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback
from typing import Any, Callable, List, Optional, Sequence

from transformers import HfArgumentParser

_KEPT: List[Any] = []  # process groups left by ``leave_process_group``: never destroyed in this process


def run_cli(argument_types: Sequence[type], run: Callable[..., Any], argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` into ``argument_types`` and call ``run(*parsed)``. Bad input (missing file,
    malformed record, unknown flag or value) prints ``error: ...`` and returns 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parsed = HfArgumentParser(list(argument_types)).parse_args_into_dataclasses(args=argv)
        run(*parsed)
    except (FileNotFoundError, ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if not _KEPT:
            raise
        traceback.print_exc()
        code = 1
    else:
        code = 0
    if _KEPT:
        _end_worker(code)
    return code


def leave_process_group() -> None:
    """Under torchrun, at the end of a job: wait for every rank (rank 0's save is on disk past this barrier),
    then deregister the process group. In a torchrun worker (``TORCHELASTIC_RUN_ID`` set) the object is kept, so
    that gloo's destructor never runs in it: ``run_cli`` ends the worker with ``os._exit``. Any other process
    (one that set up its own group, a test) only deregisters it and is never ended by ``run_cli``.

    The destructor, run by the main thread with the GIL held (when a pipeline's locals, DDP's reducer among
    them, were freed), waits for a lock that one of gloo's threads holds while it waits for the GIL to free a
    finished collective's tensors: a deadlock (one two-node run in 30 under load; the other node's launcher
    gave up after 300 s). Left to interpreter exit instead, the same objects aborted a rank ("terminate called
    without an active exception", 11 in 80). torch has no shutdown for gloo that would avoid both."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: run_cli ends it with os._exit
            _KEPT.append(dist.group.WORLD)
        dist.destroy_process_group()


def _end_worker(code: int) -> None:
    """End a torchrun worker after ``leave_process_group``: run the exit handlers (logging's flush among
    them) and flush the streams, then ``os._exit``, skipping the teardown of the kept process group."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

