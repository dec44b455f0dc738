"""Money budgets as limit checks: per key and per team, per day, month or in all.

Each budget that applies to a request is one ``budget`` check (``serving.limits.plan``)
evaluated with the token limits in the same store round trip (one Lua script on Redis):
it reserves the request's worst-case cost and is settled to its real cost. A refusal is
429 ``budget_exceeded`` naming the budget, what is left and what the request needed.
"""

from __future__ import annotations

import math
from typing import Literal

from serving.billing.config import BudgetConfig
from serving.billing.prices import NANO, to_nano
from serving.errors import BudgetExceeded
from serving.keys.records import KeyRecord
from serving.limits.plan import DAY, MONTH, PREFIX, TOTAL, Check
from serving.limits.store import Standing

Period = Literal["day", "month", "total"]
WINDOWS: dict[Period, int] = {"day": DAY, "month": MONTH, "total": TOTAL}
WORDS: dict[str, str] = {"day": "daily", "month": "monthly", "total": "total"}


def usd(nano: int) -> str:
    """Nano-dollars as dollars, exactly (``0.012345678``)."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    return f"{sign}{whole}.{frac:09d}"


def team_of(key: KeyRecord | None) -> str | None:
    """A key's team: its fair-queueing tenant (``weir keys create --tenant``)."""
    return key.tenant if key is not None and key.tenant else None


def key_budget(key: KeyRecord) -> BudgetConfig:
    return BudgetConfig(day=key.budget_day, month=key.budget_month, total=key.budget_total)


def budget_checks(
    key: KeyRecord | None, teams: dict[str, BudgetConfig], worst_case: int
) -> list[Check]:
    """One check per budget that applies to ``key`` (its own, its team's), each taking
    ``worst_case`` nano-dollars."""
    if key is None:
        return []
    checks: list[Check] = []
    owners: list[tuple[str, str, BudgetConfig | None]] = [("key", key.id, key_budget(key))]
    team = team_of(key)
    if team is not None:
        owners.append(("team", team, teams.get(team)))
    for owner, name, budget in owners:
        if budget is None:
            continue
        for period, window in WINDOWS.items():
            amount = getattr(budget, period)
            if amount is None:
                continue
            checks.append(
                Check(
                    f"budget:{owner}:{period}",
                    f"{PREFIX}budget:{owner}:{name}:{period}",
                    "budget",
                    to_nano(amount),
                    window,
                    worst_case,
                )
            )
    return checks


def budget_refusal(denied: Standing) -> BudgetExceeded:
    check = denied.check
    _, owner, period = check.name.split(":")
    whose = "this key's" if owner == "key" else "its team's"
    word = WORDS.get(period, period)
    limit, left, needed = denied.limit, denied.remaining, check.amount
    message = (
        f"Budget exceeded: {whose} {word} budget is ${usd(limit)}; ${usd(left)} is left and"
        f" this request needs up to ${usd(needed)} (its prompt plus max_tokens x n at the"
        " model's price)."
    )
    if needed > limit:
        message += " Lower max_tokens."
    retry = max(1, math.ceil(denied.reset_s)) if period != "total" else None
    headers = {
        "x-weir-budget": f"{owner}:{period}",
        "x-weir-budget-limit-usd": usd(limit),
        "x-weir-budget-remaining-usd": usd(left),
        "x-weir-budget-needed-usd": usd(needed),
    }
    return BudgetExceeded(
        message,
        budget=f"{owner}:{period}",
        limit=limit,
        remaining=left,
        needed=needed,
        retry_after_s=retry,
        headers=headers,
    )
