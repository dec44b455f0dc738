"""Writes ``deploy/grafana/weir.json``: the Weir dashboard (run after changing a panel).

python deploy/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

V = "model, model_version"
PANELS: list[tuple[str, str, list[str]]] = [
    ("Requests/s by model version", "reqps", [f"sum by ({V}) (rate(weir_requests_total[1m]))"]),
    ("Errors/s by type", "reqps", ["sum by (error_type) (rate(model_errors_total[5m]))"]),
    (
        "Gateway TTFT p50 / p95 / p99 by version",
        "s",
        [
            f"histogram_quantile({q}, sum by (le, {V}) "
            "(rate(weir_time_to_first_token_seconds_bucket[5m])))"
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    (
        "Gateway inter-token latency p50 / p95 / p99",
        "s",
        [
            f"histogram_quantile({q}, sum by (le, {V}) "
            "(rate(weir_inter_token_latency_seconds_bucket[5m])))"
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    (
        "Request duration p95 by version and route",
        "s",
        [
            f"histogram_quantile(0.95, sum by (le, {V}, route) "
            "(rate(weir_request_duration_seconds_bucket[5m])))"
        ],
    ),
    (
        "Tokens/s by version and type",
        "short",
        [f"sum by ({V}, type) (rate(tokens_used_total[1m]))"],
    ),
    (
        "In flight and queue wait p95",
        "short",
        [
            f"sum by ({V}) (weir_inflight_requests)",
            f"histogram_quantile(0.95, sum by (le, {V}) "
            "(rate(weir_queue_wait_seconds_bucket[5m])))",
        ],
    ),
    (
        "Cache hit rate by kind",
        "percentunit",
        [
            'sum by (kind) (rate(weir_cache_requests_total{result="hit"}[5m])) / sum by (kind) '
            '(rate(weir_cache_requests_total{result=~"hit|miss"}[5m]))',
            'sum by (kind) (rate(weir_cache_requests_total{result="error"}[5m]))',
        ],
    ),
    (
        "Rate-limit rejections/s by limit",
        "reqps",
        ["sum by (limit) (rate(weir_ratelimit_rejections_total[5m]))"],
    ),
    (
        "Breaker state per replica (0 closed, 1 half-open, 2 open)",
        "short",
        ["max by (replica) (weir_breaker_state)"],
    ),
    (
        "Healthy replicas, retries/s, fallbacks/s",
        "short",
        [
            f"min by ({V}) (weir_engine_replicas_healthy)",
            "sum by (model) (rate(weir_retries_total[5m]))",
            "sum by (model, fallback) (rate(weir_fallbacks_total[5m]))",
        ],
    ),
    (
        "vLLM: requests running / waiting",
        "short",
        [
            "sum by (model_name) (vllm:num_requests_running)",
            "sum by (model_name) (vllm:num_requests_waiting)",
        ],
    ),
    ("vLLM: KV cache usage", "percentunit", ["max by (model_name) (vllm:kv_cache_usage_perc)"]),
    (
        "vLLM: engine TTFT p95 (overlay the gateway's)",
        "s",
        [
            "histogram_quantile(0.95, sum by (le, model_name) "
            "(rate(vllm:time_to_first_token_seconds_bucket[5m])))"
        ],
    ),
    (
        "vLLM: generation tokens/s",
        "short",
        ["sum by (model_name) (rate(vllm:generation_tokens_total[1m]))"],
    ),
]


def panel(index: int, title: str, unit: str, exprs: list[str]) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": "__auto"}
            for n, expr in enumerate(exprs)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "Weir: gateway and engines",
        "uid": "weir-gateway",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    out = Path(__file__).parent / "grafana" / "weir.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
