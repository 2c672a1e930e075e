"""A small Prometheus text-format registry: counters, gauges and histograms with fixed label names.

Written here rather than taken from ``prometheus_client`` to keep the server's dependencies to
FastAPI and uvicorn; the output follows the text exposition format 0.0.4. Label values come only
from the server itself (status codes, reasons, route names), never from request text or keys.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Dict, List, Sequence, Tuple

__all__ = ["Counter", "Gauge", "Histogram", "MetricsRegistry", "ServerMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Dict[str, str]) -> Tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> List[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: Dict[Tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> List[str]:
        lines = self.header()
        for key, value in sorted(self._values.items()):
            lines.append(f"{self.name}{_format_labels(self.label_names, key)} {_number(value)}")
        return lines


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> List[str]:
        lines = self.header()
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self._counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class MetricsRegistry:
    def __init__(self) -> None:
        self._metrics: List[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: List[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ServerMetrics(MetricsRegistry):
    """The embedding server's metrics (names prefixed ``retrievals_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.add(Counter("retrievals_requests_total", "HTTP responses by route and status code.",
                                         ("route", "code")))
        self.failures = self.add(Counter("retrievals_request_failures_total",
                                         "Failed embedding and search requests by reason.", ("reason",)))
        self.embeddings = self.add(Counter("retrievals_embeddings_total", "Texts embedded."))
        self.prompt_tokens = self.add(Counter("retrievals_prompt_tokens_total", "Tokens embedded (after truncation)."))
        self.queue_size = self.add(Gauge("retrievals_queue_size", "Texts waiting for a batch."))
        self.slots_in_use = self.add(Gauge("retrievals_capacity_in_use", "Admitted texts not yet answered."))
        self.batch_size = self.add(Histogram("retrievals_batch_size", "Texts per model batch.", SIZE_BUCKETS))
        self.batch_tokens = self.add(Histogram("retrievals_batch_tokens", "Tokens per model batch.", TOKEN_BUCKETS))
        self.request_duration = self.add(Histogram("retrievals_request_duration_seconds",
                                                   "Embedding and search request latency (admitted requests).", LATENCY_BUCKETS))
        self.tokenize_duration = self.add(Histogram("retrievals_tokenize_duration_seconds",
                                                    "Tokenization time per request.", LATENCY_BUCKETS))
        self.queue_duration = self.add(Histogram("retrievals_queue_duration_seconds",
                                                 "Time from admission to the start of the batch.", LATENCY_BUCKETS))
        self.inference_duration = self.add(Histogram("retrievals_inference_duration_seconds",
                                                     "Model time per batch.", LATENCY_BUCKETS))
        self.searches = self.add(Counter("retrievals_search_queries_total", "Queries searched in the index."))
        self.search_duration = self.add(Histogram("retrievals_index_search_duration_seconds",
                                                  "Index search time per /v1/search request.", LATENCY_BUCKETS))
