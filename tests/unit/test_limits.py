"""Limit stores (in-process and a real Redis, same tests), the limiter's policy, headers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from serving.cli.main import main
from serving.errors import LimitsUnavailable, RateLimited
from serving.keys.records import KeyRecord
from serving.limits.headers import duration
from serving.limits.limiter import Limiter
from serving.limits.plan import Check, plan, reservation_size
from serving.limits.redis_store import RedisLimitStore
from serving.limits.store import LimitStore, MemoryLimitStore
from tests.redis_server import dead_port


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[LimitStore]:
    if request.param == "memory":
        made: LimitStore = MemoryLimitStore()
    else:
        redis.Redis.from_url(redis_url).flushdb()
        made = RedisLimitStore(redis_url)
    yield made
    await made.aclose()


def key(**limits: int) -> KeyRecord:
    return KeyRecord(hash="ab" * 32, name="t", **limits)  # type: ignore[arg-type]


def requests(limit: int) -> list[Check]:
    return [Check("rpm", "weir:{rl}:test:rpm", "requests", limit, 60, 1)]


def tokens(limit: int, amount: int, scope: str = "weir:{rl}:test:tpm") -> list[Check]:
    return [Check("tpm", scope, "tokens", limit, 60, amount)]


async def wait_for_fresh_window(seconds_needed: float = 5.0) -> None:
    left = 60 - time.time() % 60
    if left < seconds_needed:
        await asyncio.sleep(left + 0.05)


def test_plan_lists_the_key_limits_and_the_model_budget() -> None:
    checks = plan(key(rpm=5, tpm=100, tokens_per_day=1000, max_concurrency=2), "m", 30, None)
    assert [c.name for c in checks] == [
        "rpm",
        "tpm",
        "tokens_per_day",
        "max_concurrency",
        "model_tpm",
    ]
    assert [c.amount for c in checks] == [1, 30, 30, 1, 30]
    assert checks[-1].limit == -1  # counted, not limited
    assert [c.name for c in plan(None, "m", 30, 500)] == ["model_tpm"]
    assert reservation_size(12, 100, 2) == 212
    assert reservation_size(None, None, 1) == 0


@pytest.mark.anyio
async def test_requests_are_admitted_up_to_the_limit(store: LimitStore) -> None:
    await wait_for_fresh_window()
    seen = [await store.admit(f"r{i}", "m", requests(3), 60) for i in range(4)]
    assert [d.admitted for d in seen] == [True, True, True, False]
    assert [d.standings[0].remaining for d in seen[:3]] == [2, 1, 0]
    denied = seen[3].denied
    assert denied is not None
    assert (denied.limit, denied.remaining) == (3, 0)
    assert 0 < denied.reset_s <= 60


@pytest.mark.anyio
async def test_tokens_are_reserved_then_settled_to_usage(store: LimitStore) -> None:
    await wait_for_fresh_window()
    assert (await store.admit("a", "m", tokens(100, 80), 60)).admitted
    assert not (await store.admit("b", "m", tokens(100, 30), 60)).admitted
    assert (await store.outstanding()).reservations == 1
    assert await store.settle("a", 50)  # used 50 of the 80 reserved
    assert not await store.settle("a", 50)  # a second settle changes nothing
    second = await store.admit("b", "m", tokens(100, 30), 60)
    assert second.admitted
    assert second.standings[0].remaining == 20
    assert await store.settle("b", 0)  # released: a failure charges nothing
    third = await store.admit("c", "m", tokens(100, 50), 60)
    assert third.standings[0].remaining == 0
    await store.settle("c", 50)
    assert (await store.outstanding()).reservations == 0


@pytest.mark.anyio
async def test_a_refusal_charges_nothing(store: LimitStore) -> None:
    await wait_for_fresh_window()
    both = requests(10) + tokens(10, 8)
    assert (await store.admit("a", "m", both, 60)).admitted
    refused = await store.admit("b", "m", both, 60)
    assert refused.denied is not None
    assert refused.denied.check.name == "tpm"
    # the request counter was not charged for the refused request
    assert (await store.admit("c", "m", requests(10), 60)).standings[0].remaining == 8


@pytest.mark.anyio
async def test_concurrency_slots_free_on_settle_and_at_lease_end(store: LimitStore) -> None:
    slots = [Check("max_concurrency", "weir:{rl}:test:conc", "concurrency", 2, 0, 1)]
    assert (await store.admit("a", "m", slots, 60)).admitted
    leased = time.monotonic()  # b's lease starts after this
    assert (await store.admit("b", "m", slots, 0.3)).admitted
    assert not (await store.admit("c", "m", slots, 60)).admitted
    await store.settle("a", 0)
    assert (await store.admit("c", "m", slots, 60)).admitted
    # b's gateway "died": its slot frees when its 0.3 s lease runs out, never before (a
    # refused admission charges nothing, so asking again until then changes nothing)
    deadline = leased + 10
    while not (await store.admit("d", "m", slots, 60)).admitted:
        assert time.monotonic() < deadline, "b's lease never ran out"
        await asyncio.sleep(0.02)
    assert time.monotonic() - leased >= 0.3
    assert not (await store.admit("e", "m", slots, 60)).admitted


@pytest.mark.anyio
async def test_model_budget_changes_at_runtime(store: LimitStore) -> None:
    await wait_for_fresh_window()
    budget = [Check("model_tpm", "weir:{rl}:model:m:tpm", "model_tokens", -1, 60, 40)]
    assert (await store.admit("a", "m", budget, 60)).admitted  # unlimited, but counted
    await store.set_model_tpm("m", 60)
    refused = await store.admit("b", "m", budget, 60)
    assert refused.denied is not None
    assert (refused.denied.limit, refused.denied.remaining) == (60, 20)
    assert await store.model_tpms() == {"m": 60}
    await store.set_model_tpm("m", None)
    assert (await store.admit("c", "m", budget, 60)).admitted
    assert await store.model_tpms() == {}


@pytest.mark.anyio
async def test_memory_windows_roll_over_with_the_clock() -> None:
    clock = Clock(960_000.0)  # a window start (16,000 minutes)
    store = MemoryLimitStore(clock=clock)
    assert (await store.admit("a", "m", requests(1), 60)).admitted
    clock.now += 59.5
    assert not (await store.admit("b", "m", requests(1), 60)).admitted
    clock.now += 0.5
    assert (await store.admit("c", "m", requests(1), 60)).admitted


def test_headers_follow_openai() -> None:
    assert duration(0.02) == "20ms"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"
    assert duration(59.9994) == "59.999s"


@pytest.mark.anyio
async def test_limiter_refuses_with_retry_after_and_headers() -> None:
    window = MemoryLimitStore(clock=Clock(960_000.0))  # one window, whenever the test runs
    limiter = Limiter(window)
    checks = plan(key(rpm=1, tpm=1000), "m", 10, None)
    ticket = await limiter.admit("m", checks)
    assert ticket.headers["x-ratelimit-limit-requests"] == "1"
    assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "990"
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("m", checks)
    assert 1 <= refused.value.retry_after_s <= 60
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert "1 requests per minute" in refused.value.message
    ticket.finish(7)
    ticket.finish(None)  # only the first finish counts
    await limiter.drain()
    assert (await limiter.store.outstanding()).reservations == 0


@pytest.mark.anyio
async def test_limiter_fails_closed_fast_and_recovers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(0.0)
    with dead_port() as port:
        dead = RedisLimitStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        tried = 0
        admit = dead.admit

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal tried
            tried += 1
            return await admit(*args, **kwargs)

        monkeypatch.setattr(dead, "admit", counted)
        limiter = Limiter(dead, policy="closed", retry_s=1.0, clock=clock)
        checks = plan(key(rpm=100), "m", 5, None)
        started = time.monotonic()
        with pytest.raises(LimitsUnavailable):
            await limiter.admit("m", checks)
        assert tried == 1
        with pytest.raises(LimitsUnavailable):  # inside retry_s: Redis is not even tried
            await limiter.admit("m", checks)
        assert tried == 1
        # "fast" is a promise about time: a refusal within the store's 0.2 s timeout
        # (the bound is generous; which calls reached Redis is counted above)
        assert time.monotonic() - started < 1.0
    limiter.store = RedisLimitStore(redis_url)  # "Redis is back"
    with pytest.raises(LimitsUnavailable):
        await limiter.admit("m", checks)  # still inside retry_s
    clock.now += 1.0
    ticket = await limiter.admit("m", checks)
    assert ticket.store is limiter.store
    ticket.finish(5)
    await limiter.aclose()
    await dead.aclose()


@pytest.mark.anyio
async def test_limiter_fails_open_to_a_local_bound() -> None:
    with dead_port() as port:
        dead = RedisLimitStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        limiter = Limiter(dead, policy="open")
        limiter.fallback = MemoryLimitStore(clock=Clock(960_000.0))  # one window throughout
        checks = plan(key(rpm=2), "m", 5, None)
        first = await limiter.admit("m", checks)
        second = await limiter.admit("m", checks)
        assert first.store is second.store is limiter.fallback
        with pytest.raises(RateLimited):
            await limiter.admit("m", checks)  # the per-process bound still holds
    first.finish(5)
    second.finish(None)
    await limiter.aclose()


def test_cli_sets_and_shows_model_budgets(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    config = tmp_path / "weir.toml"
    config.write_text(f'[limits]\nredis_url = "{redis_url}"\nmodel_tpm = {{ smollm2 = 900 }}\n')
    assert main(["--config", str(config), "limits", "set", "smollm2", "--tpm", "100"]) == 0
    assert main(["--config", str(config), "limits", "show"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["models"]["smollm2"] == {"configured_tpm": 900, "runtime_tpm": 100}
    assert shown["outstanding"] == {"reservations": 0, "tokens": 0}
    assert main(["--config", str(config), "limits", "set", "smollm2", "--clear"]) == 0
    assert redis.Redis.from_url(redis_url).hgetall("weir:{rl}:model-tpm") == {}
    assert main(["--config", str(config), "limits", "set", "smollm2"]) == 2
