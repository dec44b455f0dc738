"""Observability: Prometheus metrics, OpenTelemetry traces and the per-request log line."""
