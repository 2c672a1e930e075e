"""Where exported graphs live: ``<model folder>/openvino/`` beside the model when that folder is writable,
else ``<cache>/openvino/<fingerprint>/``. ``retrievals_export.json`` records the fingerprint of the model the graph
was made from (a graph of other weights is never reused: it is exported again) and, for int8, what it
was calibrated on."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, Optional

EXPORT_FILE = "retrievals_export.json"


def cache_dir() -> str:
    """``$RETRIEVALS_CACHE_DIR``, else ``$XDG_CACHE_HOME/retrievals`` (``~/.cache/retrievals``)."""
    return os.environ.get("RETRIEVALS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "retrievals")


def _writable(folder: str) -> bool:
    target = folder if os.path.isdir(folder) else os.path.dirname(folder)
    return bool(target) and os.access(target, os.W_OK)


def export_folder(backend: str, model_dir: Optional[str], fingerprint: str,
                  explicit: Optional[str] = None) -> str:
    """The folder for ``backend``'s export of the model with ``fingerprint``."""
    if explicit:
        return explicit
    if model_dir and os.path.isdir(model_dir) and _writable(os.path.join(model_dir, backend)):
        return os.path.join(model_dir, backend)
    return os.path.join(cache_dir(), backend, fingerprint)


def read_record(folder: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(folder, EXPORT_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers see the old file
    or the new one, never half of one. The package's one JSON writer for caches and manifests."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_record(folder: str, record: Dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, EXPORT_FILE), record)


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` across processes (``flock``; a no-op where there is none), held
    while a graph is checked, exported or quantised, so parallel workers export once and never read half
    a file."""
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(os.path.join(folder, ".retrievals.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
