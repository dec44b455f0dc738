"""Money budgets in the limit stores: the in-process store and Redis's Lua script answer
the same (reserve the worst case, settle to the cost, refuse with what is left), the
calendar month is the same arithmetic in both, and prices pick the one in effect."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from serving.billing.budgets import budget_checks, budget_refusal, usd
from serving.billing.config import BudgetConfig, PriceConfig
from serving.billing.prices import NANO, PriceBook
from serving.errors import BudgetExceeded, render
from serving.keys.records import KeyRecord
from serving.limits.plan import MONTH, Check
from serving.limits.redis_store import MONTH_START, RedisLimitStore
from serving.limits.store import LimitStore, MemoryLimitStore, month_start

ids = itertools.count()


def key(**fields: object) -> KeyRecord:
    return KeyRecord(hash=f"{next(ids) + 10**9:012x}" + "0" * 52, name="k", **fields)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[LimitStore]:
    if request.param == "memory":
        yield MemoryLimitStore()
        return
    made = RedisLimitStore(redis_url)
    yield made
    await made.aclose()


async def admit(store: LimitStore, rid: str, checks: list[Check]) -> Any:
    return await store.admit(rid, "m", checks, 60)


@pytest.mark.anyio
async def test_budget_reserves_worst_case_settles_to_cost_and_refuses_with_what_is_left(
    store: LimitStore,
) -> None:
    owner = key(budget_day=1.0, budget_total=1.5)
    worst = 400_000_000  # $0.40
    checks = budget_checks(owner, {}, worst)
    assert [c.name for c in checks] == ["budget:key:day", "budget:key:total"]
    for rid in ("a", "b"):
        assert (await admit(store, rid, checks)).admitted
    refused = await admit(store, "c", checks)  # 0.8 held: 0.2 left of the day, 0.4 needed
    assert not refused.admitted
    denied = refused.denied
    assert (denied.check.name, denied.limit, denied.remaining) == (
        "budget:key:day", NANO, 200_000_000,
    )  # fmt: skip
    await store.settle("a", 10, 123_456_789)  # cost less than reserved
    await store.settle("a", 10, 999)  # a second settle changes nothing
    again = await admit(store, "d", checks)  # 0.523456789 held: 0.476543211 left
    assert again.admitted
    day = next(s for s in again.standings if s.check.name == "budget:key:day")
    assert day.remaining == NANO - 123_456_789 - 2 * worst
    await store.settle("b", 0, 0)  # released
    await store.settle("d", 0, 0)
    spent = budget_checks(owner, {}, 0)
    day = next(
        s for s in (await admit(store, "e", spent)).standings if s.check.name == "budget:key:day"
    )
    assert day.remaining == NANO - 123_456_789  # only the settled cost is left spent


@pytest.mark.anyio
async def test_total_budget_takes_exactly_what_is_left(store: LimitStore) -> None:
    owner = key(budget_total=0.001)
    assert (await admit(store, "a", budget_checks(owner, {}, 600_000))).admitted
    await store.settle("a", 0, 599_999)
    assert (await admit(store, "b", budget_checks(owner, {}, 400_001))).admitted
    await store.settle("b", 0, 400_000)
    last = await admit(store, "c", budget_checks(owner, {}, 2))
    assert not last.admitted
    assert last.denied.check.name == "budget:key:total"
    assert last.denied.remaining == 1


@pytest.mark.anyio
async def test_team_budget_applies_to_each_of_its_keys(store: LimitStore) -> None:
    teams = {"research": BudgetConfig(month=0.01)}
    one, two = key(tenant="research"), key(tenant="research")
    assert (await admit(store, "1", budget_checks(one, teams, 6_000_000))).admitted
    refused = await admit(store, "2", budget_checks(two, teams, 6_000_000))
    assert refused.denied.check.name == "budget:team:month"
    assert refused.denied.check.window_s == MONTH
    error = budget_refusal(refused.denied)
    status, body, headers = render(error, "req-1")
    assert status == 429
    assert body["error"]["code"] == "budget_exceeded"
    assert "team's monthly budget is $0.010000000; $0.004000000 is left" in error.message
    assert "needs up to $0.006000000" in error.message
    assert headers["x-weir-budget"] == "team:month"
    assert headers["x-weir-budget-remaining-usd"] == "0.004000000"
    assert 0 < int(headers["retry-after"]) <= 31 * 86_400


def test_total_budget_refusal_has_no_retry_after() -> None:
    store = MemoryLimitStore()
    checks = budget_checks(key(budget_total=0.001), {}, 2_000_000)
    decision = asyncio.run(store.admit("x", "m", checks, 60))
    error = budget_refusal(decision.denied)  # type: ignore[arg-type]
    assert isinstance(error, BudgetExceeded)
    status, _, headers = render(error, "r")
    assert status == 429
    assert "retry-after" not in headers
    assert "Lower max_tokens" in error.message


def test_month_start_matches_the_calendar_in_python_and_in_redis_lua(redis_url: str) -> None:
    times = [0, 951_782_400 - 1, 951_782_400, 1_709_164_800 + 86_399, 4_102_444_800 - 1]
    times += list(range(946_684_800, 4_102_444_800, 3_123_457))  # 2000..2100
    lua = redis.Redis.from_url(redis_url).register_script(
        MONTH_START + "local out = {} for i, t in ipairs(ARGV) do"
        " out[i] = month_start(tonumber(t)) end return out"
    )
    from_lua = [int(v) for v in lua(args=times)]
    for t, got in zip(times, from_lua, strict=True):
        day = datetime.fromtimestamp(t, UTC)
        expected = int(datetime(day.year, day.month, 1, tzinfo=UTC).timestamp())
        assert month_start(t) == expected == got, t


def test_price_in_effect_by_time_and_adapter_before_base() -> None:
    book = PriceBook(
        [
            PriceConfig(model="smollm2", prompt_per_m=0.1, completion_per_m=0.4),
            PriceConfig(
                model="smollm2", prompt_per_m=0.2, completion_per_m=0.8,
                since=datetime(2030, 1, 1, tzinfo=UTC),
            ),
            PriceConfig(model="smollm2:pirate", version="135m-instruct:pirate",
                        gpu_second=0.001, prompt_tokens_per_gpu_s=10_000,
                        completion_tokens_per_gpu_s=500),
        ]
    )  # fmt: skip
    before = book.price(("smollm2",), "135m-instruct", datetime(2029, 6, 1, tzinfo=UTC).timestamp())
    after = book.price(("smollm2",), "135m-instruct", datetime(2030, 6, 1, tzinfo=UTC).timestamp())
    assert before is not None
    assert after is not None
    assert before.cost(1_000_000, 1_000_000) == 500_000_000  # $0.50
    assert after.cost(1_000_000, 1_000_000) == NANO
    assert before.cost(1000, 0, cached=1000) == before.cost(1000, 0)  # cached: prompt price
    pirate = book.price(("smollm2:pirate", "smollm2"), "135m-instruct:pirate", 0)
    assert pirate is not None  # its own price; a plain version falls back to the model's
    assert pirate.cost(0, 1000) == 2_000_000  # 0.001 $/s / 500 tok/s: 2e-6 $ a token
    assert usd(pirate.worst_case(10_000, 1000)) == "0.003000000"
