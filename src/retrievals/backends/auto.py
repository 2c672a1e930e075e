"""``backend="auto"``: measure the candidate paths once on a sample of real inputs, keep the fastest whose
vectors stay near-lossless (min cosine to the fp32 reference >= ``MIN_COSINE``), and cache the choice on
disk per CPU, model architecture and library versions, so later runs decide at once."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from .store import cache_dir, write_json_atomic

logger = logging.getLogger(__name__)

CHOICE_FILE = "backend-choice.json"
MIN_COSINE = 0.999


def _path() -> str:
    return os.path.join(cache_dir(), CHOICE_FILE)


def cached_choice(key: str) -> Optional[Dict[str, Any]]:
    try:
        with open(_path(), encoding="utf-8") as f:
            record = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("choice"), str) else None


def save_choice(key: str, record: Dict[str, Any]) -> None:
    path = _path()
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    table[key] = record
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, table)
    except OSError as e:
        logger.info("backend choice not cached (%s): it will be measured again next time", e)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(axis=1).min())


def measure(candidates: Dict[str, Callable[[], np.ndarray]], reference: np.ndarray, texts: int,
            rounds: int = 2) -> Dict[str, Any]:
    """Run every candidate once to warm up, then ``rounds`` interleaved timed rounds; the choice is the
    fastest (best round) among those at or above ``MIN_COSINE``, else the first candidate."""
    fidelity = {name: min_cosine(run(), reference) for name, run in candidates.items()}
    best: Dict[str, float] = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    speed = {name: round(texts / seconds, 2) for name, seconds in best.items()}
    eligible = [name for name in candidates if fidelity[name] >= MIN_COSINE] or [next(iter(candidates))]
    choice = max(eligible, key=lambda name: speed[name])
    return {"choice": choice, "texts_per_second": speed, "min_cosine": {k: round(v, 6) for k, v in fidelity.items()},
            "texts": texts, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
