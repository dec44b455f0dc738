"""A "TTFT / ITL" tab in Locust's web UI (``weir bench ui``), per variant.

Streaming users report three request events per stream (``SSE`` end to end, ``TTFT``,
``ITL`` the mean inter-token gap), so Locust's own stats, aggregated across workers by
Locust itself, already hold them; this tab puts them side by side per variant, with the
streams' error count. Locust rounds its stats (to 2 significant digits above 100 ms);
the exact figures are in the run's samples and ``results.json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from locust.env import Environment

TAB = "weir-streams"
COLUMNS = [
    ("variant", "Variant"),
    ("streams", "Streams"),
    ("failures", "Failed"),
    ("ttft_p50", "TTFT p50 (ms)"),
    ("ttft_p90", "TTFT p90 (ms)"),
    ("ttft_p99", "TTFT p99 (ms)"),
    ("itl_p50", "ITL p50 (ms)"),
    ("itl_p99", "ITL p99 (ms)"),
    ("e2e_p50", "E2E p50 (ms)"),
    ("e2e_p99", "E2E p99 (ms)"),
]
_LABEL = re.compile(r"\[(.+)\]$")


def rows(environment: Environment) -> list[dict[str, Any]]:
    """One row per variant, from Locust's stats entries (``SSE``, ``TTFT``, ``ITL``)."""
    table: dict[str, dict[str, Any]] = {}
    for (name, method), entry in environment.stats.entries.items():
        found = _LABEL.search(name)
        if not found or method not in ("SSE", "TTFT", "ITL"):
            continue
        row = table.setdefault(found.group(1), {"variant": found.group(1)})
        if not entry.num_requests:
            continue
        prefix = {"SSE": "e2e", "TTFT": "ttft", "ITL": "itl"}[method]
        for q in (50, 90, 99):
            row[f"{prefix}_p{q}"] = entry.get_response_time_percentile(q / 100)
        if method == "SSE":
            row["streams"] = entry.num_requests
            row["failures"] = entry.num_failures
    return [table[label] for label in sorted(table)]


def install(environment: Environment) -> None:
    web_ui = environment.web_ui
    if web_ui is None or web_ui.app is None:
        return
    app = web_ui.app
    web_ui.template_args["extendedTabs"] = [{"title": "TTFT / ITL", "key": TAB}]
    web_ui.template_args["extendedTables"] = [
        {"key": TAB, "structure": [{"key": k, "title": t} for k, t in COLUMNS]}
    ]

    from flask import Response, request

    @app.after_request
    def _streams(response: Response) -> Response:
        if request.path != "/stats/requests" or not response.is_json:
            return response
        body = response.get_json() or {}
        extended = [{"key": TAB, "data": rows(environment)}]
        response.set_data(json.dumps({**body, "extended_stats": extended}))
        return response

    @app.route("/weir/streams")
    def _table() -> Response:
        return Response(json.dumps(rows(environment)), mimetype="application/json")
