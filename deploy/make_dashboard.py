"""Writes the Weir dashboard (run after changing a panel): ``deploy/grafana/weir.json``, the
Helm chart's copy (``deploy/helm/weir/files/weir.json``) and the dashboard ConfigMap in the
checked-in renders (``deploy/helm/rendered/*.yaml``, written as ``helm template`` would).

python deploy/make_dashboard.py

The variables ``model`` and ``version`` (label values of ``weir_requests_total``; several
or All) filter every panel whose series carry them, as the runbooks ask ("Errors/s by
type" for one ``model_version``). vLLM's panels are not filtered: the engines' series are
labelled by the scrape (file_sd: ``model``/``model_version``; the chart's ServiceMonitor:
``weir_ai_model``/``weir_ai_version``), not by vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
V = "model, model_version"
F = 'model=~"$model", model_version=~"$version"'  # the dashboard's variables
REPLICA = 'replica=~"($model)@($version)#.*"'  # replica keys are model@version#n
PANELS: list[tuple[str, str, list[str]]] = [
    (
        "Requests/s by model version",
        "reqps",
        [f"sum by ({V}) (rate(weir_requests_total{{{F}}}[1m]))"],
    ),
    (
        "Errors/s by type",
        "reqps",
        [f"sum by ({V}, error_type) (rate(model_errors_total{{{F}}}[5m]))"],
    ),
    (
        "Error share (5xx) by version",
        "percentunit",
        [
            f'sum by ({V}) (rate(weir_requests_total{{{F}, status=~"5.."}}[5m])) / '
            f"sum by ({V}) (rate(weir_requests_total{{{F}}}[5m]))"
        ],
    ),
    (
        "Gateway TTFT p50 / p95 / p99 by version",
        "s",
        [
            f"histogram_quantile({q}, sum by (le, {V}) "
            f"(rate(weir_time_to_first_token_seconds_bucket{{{F}}}[5m])))"
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    (
        "Gateway inter-token latency p50 / p95 / p99",
        "s",
        [
            f"histogram_quantile({q}, sum by (le, {V}) "
            f"(rate(weir_inter_token_latency_seconds_bucket{{{F}}}[5m])))"
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    (
        "Request duration p95 by version and route",
        "s",
        [
            f"histogram_quantile(0.95, sum by (le, {V}, route) "
            f"(rate(weir_request_duration_seconds_bucket{{{F}}}[5m])))"
        ],
    ),
    (
        "Tokens/s by version and type",
        "short",
        [f"sum by ({V}, type) (rate(tokens_used_total{{{F}}}[1m]))"],
    ),
    (
        "In flight and queue wait p95",
        "short",
        [
            f"sum by ({V}) (weir_inflight_requests{{{F}}})",
            f"histogram_quantile(0.95, sum by (le, {V}) "
            f"(rate(weir_queue_wait_seconds_bucket{{{F}}}[5m])))",
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
        [f"max by (replica) (weir_breaker_state{{{REPLICA}}})"],
    ),
    (
        "Healthy replicas, retries/s, fallbacks/s",
        "short",
        [
            f"min by ({V}) (weir_engine_replicas_healthy{{{F}}})",
            'sum by (model) (rate(weir_retries_total{model=~"$model"}[5m]))',
            'sum by (model, fallback) (rate(weir_fallbacks_total{model=~"$model"}[5m]))',
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


def variable(name: str, query: str) -> dict[str, Any]:
    """A query variable over a label's values: several may be picked, All matches any."""
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
        "refresh": 2,  # on time range change: new versions appear without a reload
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "Weir: gateway and engines",
        "uid": "weir-gateway",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                variable("model", "label_values(weir_requests_total, model)"),
                variable(
                    "version", 'label_values(weir_requests_total{model=~"$model"}, model_version)'
                ),
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def rendered_with(text: str, board: str) -> str:
    """A render with its dashboard ConfigMap's ``weir.json`` (the file's last value) replaced."""
    start = text.index('\n  weir.json: "') + 1
    value = yaml.safe_dump({"weir.json": board.rstrip("\n")}, width=998, allow_unicode=True)
    return text[:start] + "".join("  " + line for line in value.splitlines(True))


def main() -> None:
    board = json.dumps(dashboard(), indent=2) + "\n"
    for out in (DEPLOY / "grafana" / "weir.json", DEPLOY / "helm" / "weir" / "files" / "weir.json"):
        out.write_text(board)
        print(f"wrote {out}")
    for out in sorted((DEPLOY / "helm" / "rendered").glob("*.yaml")):
        out.write_text(rendered_with(out.read_text(), board))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
