"""``/weir/admin/usage``: what each key or team used and spent, from the usage ledger."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response

from serving.billing.meter import Meter
from serving.errors import InvalidRequest
from serving.http.deps import configured
from serving.ledger.report import By, UsageReport, parse_since, usage_report

router = APIRouter(prefix="/weir/admin/usage")


@router.get("", summary="Requests, tokens and cost from the usage ledger", response_model=None)
async def show(
    request: Request,
    key: Annotated[str | None, Query(max_length=64)] = None,
    team: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[str, Query(max_length=32)] = "7d",
    by: By = "day",
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> UsageReport | Response:
    meter: Meter | None = request.app.state.meter
    ledger = configured(meter.ledger if meter else None, "The usage ledger is off.")
    try:
        start = parse_since(since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from None
    # rows taken so far go in first (bounded: a database that is down answers what it has)
    await asyncio.to_thread(ledger.flush, 2.0)
    report = await asyncio.to_thread(
        usage_report, ledger.engine(), since=start, by=by, key=key, team=team
    )
    report.backlog = ledger.backlog
    if format == "csv":
        return PlainTextResponse(report.csv(), media_type="text/csv")
    return report
