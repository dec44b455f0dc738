"""Breakers, back-off, retry budget, bulkhead and router: strategy objects on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from models.engines.backoff import ExponentialBackoff
from models.engines.fleet import Fleet, Replica
from models.errors import EngineOverloaded
from models.types import ReplicaKey
from serving.routing.breaker import CircuitBreaker
from serving.routing.bulkhead import Bulkhead
from serving.routing.load import ReplicaLoad
from serving.routing.retry_budget import RetryBudget
from serving.routing.router import Candidate, LeastOutstanding, eligible
from tests.fakes.engine import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_faults_then_probes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, open_s=10, probes=1, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(True)
    assert breaker.allow()
    breaker.record(False)  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record(True)
    assert str(breaker.state) == "open"
    assert not breaker.available()
    assert not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.available()
    assert breaker.allow()  # the one probe
    assert str(breaker.state) == "half_open"
    assert not breaker.allow()  # no second probe while the first is out
    breaker.record(True)  # the probe failed: open again, for another open_s
    assert str(breaker.state) == "open"
    assert breaker.trips == 2
    clock.now += 10
    assert breaker.allow()
    breaker.forget()  # the probe's client left: no verdict, the probe slot comes back
    assert breaker.allow()
    breaker.record(False)
    assert str(breaker.state) == "closed"
    assert breaker.failures == 0


def test_full_jitter_backoff_stays_in_its_envelope() -> None:
    backoff = ExponentialBackoff(0.1, 1.0, jitter=True, rng=random.Random(7))
    for failures, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (40, 1.0)):
        draws = [backoff.compute(failures) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # it uses the whole range
    assert backoff.compute(0) == 0


def test_retry_budget_is_a_share_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.1, window_s=10, floor=2, clock=clock)
    assert budget.spend()
    assert budget.spend()
    assert not budget.spend()  # the floor is spent and there are no requests yet
    for _ in range(50):
        budget.record_request()
    assert [budget.spend() for _ in range(5)] == [True, True, True, False, False]  # 10% of 50
    clock.now += 10  # the window slides past all of it
    assert budget.spend()
    assert budget.spend()
    assert not budget.spend()


def replica(index: int, outstanding: int = 0, healthy: bool = True) -> Candidate:
    made = Replica(ReplicaKey("m", "v", index), FakeEngine(), "m", healthy=healthy)
    return made, ReplicaLoad(CircuitBreaker(), outstanding=outstanding)


def test_router_prefers_the_least_busy_and_rotates_ties() -> None:
    router = LeastOutstanding(slack=2)
    a, b, c = replica(0, 3), replica(1, 1), replica(2, 1)
    picks = {str(router.choose([a, b, c])[0].key) for _ in range(4)}
    assert picks == {"m@v#1", "m@v#2"}
    c[1].breaker.state = "open"
    c[1].breaker.opened_at = 1e18  # open for good
    assert eligible([a, b, c, replica(3, healthy=False)]) == [a, b]


def test_router_affinity_sticks_until_the_replica_is_too_busy() -> None:
    router = LeastOutstanding(slack=2)
    replicas = [replica(i) for i in range(4)]
    prompts = [f"system prompt number {i}" for i in range(40)]
    first = {p: router.choose(replicas, p) for p in prompts}
    assert len({str(r.key) for r, _ in first.values()}) >= 3  # prompts spread over replicas
    assert all(router.choose(replicas, p) is first[p] for p in prompts)  # and stick
    sticky = first[prompts[0]]
    sticky[1].outstanding = 3  # more than slack above the others
    assert router.choose(replicas, prompts[0]) is not sticky


@pytest.mark.anyio
async def test_bulkhead_queues_then_refuses_at_once() -> None:
    bulkhead = Bulkhead("m@v", max_in_flight=2, max_queue=1, timeout_s=5)
    first, second = await bulkhead.acquire(), await bulkhead.acquire()
    waiting = asyncio.ensure_future(bulkhead.acquire())
    await asyncio.sleep(0)
    assert bulkhead.queued == 1
    assert bulkhead.full()
    with pytest.raises(EngineOverloaded):
        await bulkhead.acquire()  # no place in the line: refused without waiting
    first.release()
    first.release()  # idempotent
    third = await waiting  # the freed slot went straight to the one waiting
    assert bulkhead.in_flight == 2
    second.release()
    third.release()
    assert (bulkhead.in_flight, bulkhead.queued, bulkhead.rejected) == (0, 0, 1)


@pytest.mark.anyio
async def test_bulkhead_wait_is_bounded_and_a_cancelled_waiter_leaves_no_trace() -> None:
    bulkhead = Bulkhead("m@v", max_in_flight=1, max_queue=4, timeout_s=0.05)
    held = await bulkhead.acquire()
    with pytest.raises(EngineOverloaded, match="no slot within"):
        await bulkhead.acquire()
    waiter = asyncio.ensure_future(bulkhead.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.queued == 0
    held.release()
    assert bulkhead.in_flight == 0


@pytest.mark.anyio
async def test_a_busy_replica_may_miss_a_health_check_but_not_three() -> None:

    engine = FakeEngine()
    fleet = Fleet([Replica(ReplicaKey("m", "v", 0), engine, "m")], unhealthy_after=3)
    await fleet.check_once()
    assert fleet.ready()
    engine.healthy = False
    await fleet.check_once()
    await fleet.check_once()
    assert fleet.ready()  # two slow answers in a row: still in rotation
    await fleet.check_once()
    assert not fleet.ready()
    engine.healthy = True
    await fleet.check_once()
    assert fleet.ready()  # one good answer brings it back
