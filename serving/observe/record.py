"""One request, observed: metrics, the span's GenAI attributes and the access log line.

``Observation`` is made when a request names a model and finished exactly once, by the
success path, the error path, the end of a stream or the client leaving. The log line
has ids, sizes and times, never content: no prompt, no completion, no key (the key's
short hash and the prompt's hash stand in for them).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry import trace

from models.types import VersionKey
from serving.observe.metrics import Metrics
from serving.rollout.tracker import VersionTracker, is_error

access = logging.getLogger("weir.access")
JSON = dict[str, Any]
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def prompt_hash(body: JSON) -> str:
    """A stable short hash of what was asked (to correlate, not to recover)."""
    return asked_hash(body.get("messages", body.get("prompt", body.get("input"))))


def asked_hash(asked: Any) -> str:
    try:
        raw = orjson.dumps(asked, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past orjson's limit: the request says why
        return "unhashable"
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class Observation:
    metrics: Metrics | None
    route: str
    stream: bool
    request_id: str
    key_id: str
    log_requests: bool = True
    tracker: VersionTracker | None = None
    model: str = "unknown"
    version: str = "unknown"
    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    last_at: float | None = None
    chunks: int = 0  # content chunks sent (a stream its client left is charged these)
    _asked: Any = None  # the messages, prompt or input: hashed for the log line only
    cache: str | None = None
    fallback: str | None = None
    _served: bool = False
    _done: bool = False

    @property
    def chosen(self) -> str | None:
        """The version chosen to answer (its fallback's once it fell back); None before."""
        return self.version if self._served else None

    def served(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        self._served = True
        if self.tracker is not None:
            self.tracker.enter(VersionKey(model, version))
        if self.metrics is not None:
            self.metrics.child(self.metrics.inflight, model, version).inc()

    def fell_back(self, model: str, version: str) -> None:
        """Served by a fallback: labels move to it (in-flight follows)."""
        if self.metrics is not None:
            self.metrics.child(self.metrics.inflight, self.model, self.version).dec()
            self.metrics.child(self.metrics.inflight, model, version).inc()
        new = VersionKey(model, version)
        if self.tracker is not None:
            self.tracker.move(VersionKey(self.model, self.version), new)
        self.fallback = str(new)
        self.model, self.version = model, version

    def asked(self, body: JSON) -> None:
        self._asked = body.get("messages", body.get("prompt", body.get("input")))
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute("gen_ai.operation.name", OPERATIONS.get(self.route, self.route))
        span.set_attribute("gen_ai.request.model", self.model)
        span.set_attribute("weir.model_version", self.version)
        for name, attribute in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            value = body.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                span.set_attribute(attribute, value)

    def content(self) -> None:
        """A chunk with content went out (streams)."""
        self.chunks += 1
        now = time.perf_counter()
        labels = self._labels()
        if self.first_at is None:
            self.first_at = now
            if self.metrics is not None:
                self.metrics.child(self.metrics.ttft, *labels).observe(now - self.started)
        elif self.metrics is not None and self.last_at is not None:
            self.metrics.child(self.metrics.itl, *labels).observe(now - self.last_at)
        self.last_at = now

    def finish(
        self,
        status: int,
        *,
        error_type: str | None = None,
        usage: JSON | None = None,
        span: trace.Span | None = None,
    ) -> None:
        if self._done:
            return
        self._done = True
        elapsed = time.perf_counter() - self.started
        prompt = _int(usage, "prompt_tokens")
        completion = _int(usage, "completion_tokens")
        metrics = self.metrics
        if metrics is not None:
            labels = self._labels()
            metrics.child(metrics.duration, *labels).observe(elapsed)
            metrics.child(metrics.requests, *labels, str(status)).inc()
            if error_type is not None:
                metrics.child(metrics.errors, self.model, self.version, error_type).inc()
            if prompt:
                metrics.child(metrics.tokens, self.model, self.version, "prompt").inc(prompt)
            if completion:
                metrics.child(metrics.tokens, self.model, self.version, "completion").inc(
                    completion
                )
            if self._served:
                metrics.child(metrics.inflight, self.model, self.version).dec()
        if self._served and self.tracker is not None:
            failed = is_error(status, error_type)
            first = self.first_at - self.started if self.first_at is not None else None
            ttft = None if failed or status != 200 else (elapsed if first is None else first)
            self.tracker.leave(VersionKey(self.model, self.version), ttft, failed)
        span = span or trace.get_current_span()
        if span.is_recording():
            if prompt is not None:
                span.set_attribute("gen_ai.usage.input_tokens", prompt)
            if completion is not None:
                span.set_attribute("gen_ai.usage.output_tokens", completion)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
        if not self.log_requests or not access.isEnabledFor(logging.INFO):
            return
        ctx = span.get_span_context()
        access.info(
            "%s %s@%s %s %.1fms",
            self.route, self.model, self.version, status, elapsed * 1000,
            extra={"fields": {
                "request_id": self.request_id,
                "trace_id": f"{ctx.trace_id:032x}" if ctx.is_valid else None,
                "key": self.key_id,
                "route": self.route,
                "model": self.model,
                "model_version": self.version,
                "stream": self.stream,
                "status": status,
                "error_type": error_type,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "ttft_ms": _ms(self.first_at, self.started),
                "duration_ms": round(elapsed * 1000, 2),
                "cache": self.cache,
                "fallback": self.fallback,
                "prompt_hash": None if self._asked is None else asked_hash(self._asked),
            }},
        )  # fmt: skip

    def _labels(self) -> tuple[str, str, str, str]:
        return self.model, self.version, self.route, "true" if self.stream else "false"


def _int(usage: JSON | None, name: str) -> int | None:
    value = (usage or {}).get(name)
    return value if isinstance(value, int) else None


def _ms(at: float | None, since: float) -> float | None:
    return None if at is None else round((at - since) * 1000, 2)
