"""Usage reports from the ledger: totals per day, model or version, for a key or a team.

``weir usage`` and ``GET /weir/admin/usage`` both answer with ``usage_report``. Token
totals are the ones ``tokens_used_total`` counts (the engine's usage of requests that
finished with their client there); cost is what budgets were charged.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from serving.billing.budgets import usd
from serving.ledger.schema import usage
from serving.sql_text import keyable

By = Literal["day", "model", "version", "key", "team"]
SINCE = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: float | None = None) -> float:
    """``7d``, ``12h``, ``30m`` (before now) or a unix time: the report's start."""
    now = time.time() if now is None else now
    found = SINCE.match(text.strip())
    if found is not None:
        return now - int(found.group(1)) * UNITS[found.group(2)]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"since: {text!r} is not like 7d, 12h, 30m or a unix time") from None


class UsageLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str  # the day, model, version (model@version), key or team
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: str  # exact, nine decimals
    cost_nano: int


class UsageReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: float
    until: float
    by: By
    key: str | None
    team: str | None
    lines: list[UsageLine]
    total: UsageLine
    backlog: int = 0  # rows not yet in the database when the report was made

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        fields = list(UsageLine.model_fields)
        writer.writerow([self.by if f == "group" else f for f in fields])
        for line in [*self.lines, self.total]:
            writer.writerow([getattr(line, f) for f in fields])
        return out.getvalue()


def usage_report(
    engine: Engine,
    *,
    since: float,
    until: float | None = None,
    by: By = "day",
    key: str | None = None,
    team: str | None = None,
) -> UsageReport:
    until = time.time() if until is None else until
    c = usage.c
    group = {
        "day": c.day,
        "model": c.model,
        "version": c.model + "@" + c.version,
        "key": c.key_id,
        "team": func.coalesce(c.team, "-"),
    }[by]
    query = (
        select(
            group.label("group"),
            func.count(),
            func.coalesce(func.sum(c.prompt_tokens), 0),
            func.coalesce(func.sum(c.completion_tokens), 0),
            func.coalesce(func.sum(c.cached_tokens), 0),
            func.coalesce(func.sum(c.cost_nano), 0),
        )
        .where(c.ts >= since, c.ts < until)
        .group_by(group)
        .order_by(group)
    )
    if key is not None:
        query = query.where(c.key_id == key)
    if team is not None:
        query = query.where(c.team == team)
    rows: Sequence[Any] = ()
    # a key or team no row can hold (NUL, or a lone surrogate from `weir usage --key`
    # given bytes that are not UTF-8) simply has no rows: never the query's failure
    if all(keyable(text) for text in (key, team) if text is not None):
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    lines = [_line(str(r[0]), *(int(v) for v in r[1:])) for r in rows]
    total = _line("total", *(sum(getattr(line, f) for line in lines) for f in _SUMMED))
    return UsageReport(
        since=since, until=until, by=by, key=key, team=team, lines=lines, total=total
    )


_SUMMED = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nano")


def _line(
    group: str, requests: int, prompt: int, completion: int, cached: int, cost: int
) -> UsageLine:
    return UsageLine(
        group=group, requests=requests, prompt_tokens=prompt, completion_tokens=completion,
        cached_tokens=cached, cost_usd=usd(cost), cost_nano=cost,
    )  # fmt: skip
