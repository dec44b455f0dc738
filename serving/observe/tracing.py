"""OpenTelemetry: a tracer from the standard ``OTEL_*`` variables, off when none is set.

Export is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; the OTLP
protocol follows ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or
``grpc``). Otherwise the API's no-op tracer runs: spans cost next to nothing. Tests pass
their own provider with an in-memory exporter to ``create_app``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Tracer

__all__ = ["extract", "inject", "make_provider", "recording", "span", "tracer_from"]
NO_SPAN = nullcontext(trace.INVALID_SPAN)  # reusable: entering it does nothing


def _exporter() -> SpanExporter | None:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if name == "none" or (not name and not endpoint):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def make_provider() -> TracerProvider | None:
    """A provider exporting as the environment says, or None (tracing off)."""
    exporter = _exporter()
    if exporter is None:
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "weir-gateway")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracer_from(provider: trace.TracerProvider | None) -> Tracer:
    return (provider or trace.NoOpTracerProvider()).get_tracer("weir.gateway")


def carrier(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def recording(tracer: Tracer | None) -> Tracer | None:
    """``tracer``, or None when it is the no-op one (tracing off)."""
    return None if tracer is None or isinstance(tracer, trace.NoOpTracer) else tracer


def span(tracer: Tracer | None, name: str, **options: Any) -> AbstractContextManager[trace.Span]:
    """``tracer.start_as_current_span(name)``; with tracing off, a context that costs nothing
    (even the no-op tracer's spans cost a few microseconds per request)."""
    if tracer is None:
        return NO_SPAN
    return tracer.start_as_current_span(name, **options)
