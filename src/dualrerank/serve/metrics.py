"""Prometheus metrics of the reranking service, written in the text exposition format
(version 0.0.4) by hand: `prometheus_client` is not a dependency and four metric families
do not need it.

Families:
    dualrerank_http_requests_total{path, status}   counter, every HTTP response
    dualrerank_rerank_errors_total{reason}         counter, rejected or failed rerank requests
    dualrerank_rerank_latency_seconds              histogram, server-side latency of successful reranks
    dualrerank_model_info{model_version, backend}  gauge, always 1

One instance per app (no module-level state); a lock makes updates from the worker
threads safe.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

__all__ = ["ERROR_REASONS", "LATENCY_BUCKETS", "ServiceMetrics"]

ERROR_REASONS = ("invalid_json", "invalid_request", "body_too_large", "unsupported_media_type", "non_finite_output", "internal")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
KNOWN_PATHS = ("/v1/rerank", "/healthz", "/metrics", "/openapi.json")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServiceMetrics:
    """Counters and a latency histogram; `render()` gives the Prometheus text."""

    def __init__(self, model_version: str, backend: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.model_version, self.backend = model_version, backend
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._errors: Counter[str] = Counter({r: 0 for r in ERROR_REASONS})
        self._bucket_counts = [0] * (len(self.buckets) + 1)  # last slot: above every bound
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe_response(self, path: str, status: int) -> None:
        # Unknown paths share one label so that scanners cannot grow the label set without bound.
        label = path if path in KNOWN_PATHS else "other"
        with self._lock:
            self._requests[(label, str(status))] += 1

    def observe_error(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] += 1

    def observe_latency(self, seconds: float) -> None:
        slot = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._bucket_counts[slot] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def render(self) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
            errors = sorted(self._errors.items())
            counts, total, count = list(self._bucket_counts), self._latency_sum, self._latency_count
        lines = [
            "# HELP dualrerank_http_requests_total HTTP responses by path and status code.",
            "# TYPE dualrerank_http_requests_total counter",
        ]
        lines += [f'dualrerank_http_requests_total{{path="{_escape(p)}",status="{s}"}} {v}' for (p, s), v in requests]
        lines += [
            "# HELP dualrerank_rerank_errors_total Rerank requests rejected (4xx) or failed (5xx), by reason.",
            "# TYPE dualrerank_rerank_errors_total counter",
        ]
        lines += [f'dualrerank_rerank_errors_total{{reason="{_escape(r)}"}} {v}' for r, v in errors]
        lines += [
            "# HELP dualrerank_rerank_latency_seconds Server-side latency of successful rerank requests.",
            "# TYPE dualrerank_rerank_latency_seconds histogram",
        ]
        cumulative = 0
        for bound, c in zip(self.buckets, counts, strict=False):  # counts has one more slot: +Inf, written below
            cumulative += c
            lines.append(f'dualrerank_rerank_latency_seconds_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'dualrerank_rerank_latency_seconds_bucket{{le="+Inf"}} {count}')
        lines.append(f"dualrerank_rerank_latency_seconds_sum {total:.9g}")
        lines.append(f"dualrerank_rerank_latency_seconds_count {count}")
        lines += [
            "# HELP dualrerank_model_info The model being served (value is always 1).",
            "# TYPE dualrerank_model_info gauge",
            f'dualrerank_model_info{{model_version="{_escape(self.model_version)}",backend="{_escape(self.backend)}"}} 1',
        ]
        return "\n".join(lines) + "\n"
