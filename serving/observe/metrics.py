"""The gateway's Prometheus metrics, built into a registry when the app is made.

Names and labels are the contract with dashboards and runbooks: ``tokens_used_total``
and ``model_errors_total`` exactly as the runbooks name them, the rest ``weir_*``.
TTFT and inter-token histograms use vLLM's bucket boundaries so gateway and engine views
overlay; the gateway's own timings (request duration, queue wait) use ``GATEWAY_BUCKETS``,
0.5 ms to 10 min, so a 1 ms cache hit or a 2 ms embedding reads as such, not as 0.3 s.
Label values are always bounded: model and version names from our config, routes,
error codes from our table, limit kinds, replica keys; never a key, prompt or id.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set), prometheus-client
writes every value to shared files and ``/metrics`` sums them across workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from serving.errors import spec_for

# vLLM's own boundaries (vllm/v1/metrics/buckets.py), checked by a test.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
# The gateway's own: request duration and queue wait, 0.5 ms to 10 min, roughly logarithmic
# (1-2.5-5 per decade to 10 s, denser where generations end: 10 s to 2 min).
GATEWAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)  # fmt: skip
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
VERSION = ("model", "model_version")
REQUEST = ("model", "model_version", "route", "stream")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass
class Metrics:
    registry: CollectorRegistry
    tokens: Counter
    errors: Counter
    ttft: Histogram
    itl: Histogram
    duration: Histogram
    requests: Counter
    inflight: Gauge
    queue_wait: Histogram
    limit_rejections: Counter
    budget_rejections: Counter
    retries: Counter
    fallbacks: Counter
    breaker: Gauge
    healthy: Gauge
    cache: Counter
    retrieval: Counter
    tenant_wait: Histogram
    queue_depth: Gauge
    batch_requests: Counter
    batches: Gauge
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (labels are bounded; this is per request)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def refused(self, route: str, error: BaseException) -> None:
        """A model route's answer refused before the request named a served model (its
        body, its size, its key): counted once, under model ``unknown``."""
        spec = spec_for(error)
        status, code = (spec.status, spec.code) if spec else (500, "internal_error")
        self.child(self.requests, "unknown", "unknown", route, "unknown", str(status)).inc()
        self.child(self.errors, "unknown", "unknown", code).inc()

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        reg = registry or CollectorRegistry()
        return cls(
            registry=reg,
            tokens=Counter(
                "tokens_used", "Tokens used, by model version and type (prompt|completion)",
                [*VERSION, "type"], registry=reg,
            ),
            errors=Counter(
                "model_errors", "Failed requests by model version and error type (code)",
                [*VERSION, "error_type"], registry=reg,
            ),
            ttft=Histogram(
                "weir_time_to_first_token_seconds",
                "Client-observed time to the first chunk with content", REQUEST,
                buckets=TTFT_BUCKETS, registry=reg,
            ),
            itl=Histogram(
                "weir_inter_token_latency_seconds", "Client-observed gaps between content chunks",
                REQUEST, buckets=ITL_BUCKETS, registry=reg,
            ),
            duration=Histogram(
                "weir_request_duration_seconds", "Client-observed request duration, end to end",
                REQUEST, buckets=GATEWAY_BUCKETS, registry=reg,
            ),
            requests=Counter(
                "weir_requests", "Requests that named a model, by status", [*REQUEST, "status"],
                registry=reg,
            ),
            inflight=Gauge(
                "weir_inflight_requests", "Requests in the gateway now", VERSION,
                registry=reg, multiprocess_mode="livesum",
            ),
            queue_wait=Histogram(
                "weir_queue_wait_seconds", "Time waiting for a bulkhead slot", VERSION,
                buckets=GATEWAY_BUCKETS, registry=reg,
            ),
            limit_rejections=Counter(
                "weir_ratelimit_rejections", "Requests refused by a limit, by kind",
                ["limit"], registry=reg,
            ),
            budget_rejections=Counter(
                "weir_budget_rejections",
                "Requests refused by a money budget, by budget (key|team : day|month|total)",
                ["budget"], registry=reg,
            ),
            retries=Counter(
                "weir_retries", "Requests sent again after an engine fault", ["model"],
                registry=reg,
            ),
            fallbacks=Counter(
                "weir_fallbacks", "Requests served by a fallback", ["model", "fallback"],
                registry=reg,
            ),
            breaker=Gauge(
                "weir_breaker_state", "Circuit breaker per replica: 0 closed, 1 half-open, 2 open",
                ["replica"], registry=reg, multiprocess_mode="max",
            ),
            healthy=Gauge(
                "weir_engine_replicas_healthy", "Healthy engine replicas per model version",
                VERSION, registry=reg, multiprocess_mode="min",
            ),
            cache=Counter(
                "weir_cache_requests",
                "Cache lookups by kind (response|embedding) and result (hit|miss|bypass|error)",
                ["kind", "result"], registry=reg,
            ),
            retrieval=Counter(
                "weir_retrieval_requests", "RAG retrievals by result (ok|degraded|refused)",
                ["result"], registry=reg,
            ),
            tenant_wait=Histogram(
                "weir_tenant_queue_wait_seconds",
                "Time waiting for a bulkhead slot, by priority and tenant (a key's team or name)",
                [*VERSION, "priority", "tenant"], buckets=GATEWAY_BUCKETS, registry=reg,
            ),
            queue_depth=Gauge(
                "weir_tenant_queue_depth", "Requests waiting for a slot, by priority and tenant",
                [*VERSION, "priority", "tenant"], registry=reg, multiprocess_mode="livesum",
            ),
            batch_requests=Counter(
                "weir_batch_requests",
                "Batch API requests run, by result (completed|failed|expired|cancelled)",
                ["result"], registry=reg,
            ),
            batches=Gauge(
                "weir_batches_running", "Batches this gateway is running now", [],
                registry=reg, multiprocess_mode="livesum",
            ),
        )  # fmt: skip

    def exposition(self) -> bytes:
        """The text for ``/metrics``: this registry, or every worker's in multiprocess mode."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
