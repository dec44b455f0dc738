"""Fair queueing in the bulkhead: weights, reserved headroom for light tenants, interactive
before batch, the line's bounds falling on the tenant that queues most, the adaptive limit.

The bulkhead is driven directly (its clock is a list the test moves); every wait is on a
future the bulkhead resolves, never on time.
"""

from __future__ import annotations

import asyncio

import pytest

from models.errors import EngineOverloaded
from serving.core.call import Call, Caller, never
from serving.core.priority import share_of
from serving.errors import InvalidRequest
from serving.keys.records import KeyRecord
from serving.routing.bulkhead import Bulkhead, Share, Slot
from serving.routing.served import _priority_scheduled

A = Share("a", 1.0, "interactive", "a")
B = Share("b", 1.0, "interactive", "b")
BATCH = Share("c", 1.0, "batch", "c")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: object) -> Bulkhead:
    params: dict[str, object] = {"max_in_flight": 2, "max_queue": 32, "timeout_s": 5}
    params.update(kw)
    return Bulkhead("m@v", **params)  # type: ignore[arg-type]


async def queued(bulkhead: Bulkhead, share: Share) -> asyncio.Task[Slot]:
    task = asyncio.ensure_future(bulkhead.acquire(share))
    await asyncio.sleep(0)  # it has reached the line
    return task


@pytest.mark.anyio
async def test_a_tenant_alone_gets_every_slot() -> None:
    bulkhead = make(max_in_flight=8)
    slots = [await bulkhead.acquire(A) for _ in range(8)]
    assert bulkhead.in_flight == 8
    for slot in slots:
        slot.release()
    assert bulkhead.in_flight == 0


@pytest.mark.anyio
async def test_under_contention_slots_follow_the_weights() -> None:
    bulkhead = make(max_in_flight=1)
    held = await bulkhead.acquire(A)
    heavy = Share("b", 2.0, "interactive", "b")
    order: list[str] = []
    tasks = []
    for _ in range(6):
        tasks.append((await queued(bulkhead, A), "a"))
    for _ in range(6):
        tasks.append((await queued(bulkhead, heavy), "b"))
    held.release()
    pending = dict(tasks)
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # one slot: one at a time
        task = done.pop()
        order.append(pending.pop(task))
        task.result().release()
    # a flooded line (a's six came first) still gives b two slots for each of a's
    assert order[:6].count("b") == 4
    assert order.count("a") == order.count("b") == 6


@pytest.mark.anyio
async def test_a_light_tenant_finds_a_slot_kept_for_it() -> None:
    clock = Clock()
    bulkhead = make(max_in_flight=5, clock=clock)
    (await bulkhead.acquire(B)).release()  # b asked lately: its peak + 1 slots are kept
    flood = [await bulkhead.acquire(A) for _ in range(3)]
    waiting = await queued(bulkhead, A)
    assert bulkhead.in_flight == 3
    assert bulkhead.queued == 1  # a's fourth waits
    slot = await asyncio.wait_for(bulkhead.acquire(B), 1)  # b's next one: at once
    assert bulkhead.in_flight == 4
    slot.release()
    flood[0].release()  # a freed slot goes to a's waiter (b is within its reserve)
    (await waiting).release()
    for s in flood[1:]:
        s.release()


@pytest.mark.anyio
async def test_a_kept_slot_is_given_back_when_the_tenant_stays_away() -> None:
    bulkhead = make(max_in_flight=2, window_s=0.05)
    (await bulkhead.acquire(B)).release()
    held = await bulkhead.acquire(A)
    waiting = await queued(bulkhead, A)  # the free slot is b's for now
    slot = await asyncio.wait_for(waiting, 5)  # given to a once b is forgotten
    assert bulkhead.in_flight == 2
    slot.release()
    held.release()


@pytest.mark.anyio
async def test_batch_waits_for_the_room_interactive_traffic_leaves() -> None:
    bulkhead = make(max_in_flight=2)
    first = await bulkhead.acquire(A)
    batch = await queued(bulkhead, BATCH)  # a's demand keeps its second slot free
    assert not batch.done()
    second = await bulkhead.acquire(A)  # and a gets it at once
    interactive = await queued(bulkhead, B)
    first.release()  # interactive first, though the batch request came earlier
    (await interactive).release()
    assert not batch.done()
    second.release()
    bulkhead.window_s = 1e-9  # a's demand forgotten: the batch request may go
    bulkhead._roll(bulkhead.clock() + 10)
    for tenant in bulkhead._tenants.values():
        tenant.seen = float("-inf")
    bulkhead._dispatch()
    (await asyncio.wait_for(batch, 1)).release()
    assert bulkhead.in_flight == 0


@pytest.mark.anyio
async def test_a_full_line_refuses_the_tenant_that_queues_most() -> None:
    bulkhead = make(max_in_flight=1, max_queue=3)
    held = await bulkhead.acquire(A)
    flood = [await queued(bulkhead, A) for _ in range(3)]
    light = await queued(bulkhead, B)  # the line is full: a's newest waiter goes
    with pytest.raises(EngineOverloaded):
        await flood[-1]
    with pytest.raises(EngineOverloaded):
        await bulkhead.acquire(A)  # a queues most: its own arrival is refused
    assert bulkhead.queued == 3
    held.release()
    (await light).release()  # b's request went before a's two older ones
    for task in flood[:2]:
        (await task).release()
    assert (bulkhead.in_flight, bulkhead.queued, bulkhead.rejected) == (0, 0, 2)


@pytest.mark.anyio
async def test_one_tenants_line_is_bounded() -> None:
    bulkhead = make(max_in_flight=1, max_queue=10, max_tenant_queue=2)
    held = await bulkhead.acquire(A)
    waiting = [await queued(bulkhead, A) for _ in range(2)]
    with pytest.raises(EngineOverloaded):
        await bulkhead.acquire(A)
    other = await queued(bulkhead, B)  # another tenant still queues
    held.release()
    for task in [other, *waiting]:
        (await task).release()


@pytest.mark.anyio
async def test_fcfs_when_fair_queueing_is_off() -> None:
    bulkhead = make(max_in_flight=1, fair=False)
    held = await bulkhead.acquire(A)
    tasks = [await queued(bulkhead, share) for share in (A, A, BATCH, B)]
    held.release()
    for task in tasks:  # in the order they came, whoever they are
        slot = await task
        assert all(t.done() for t in tasks[: tasks.index(task) + 1])
        slot.release()


@pytest.mark.anyio
async def test_the_adaptive_limit_follows_the_engines_first_token_time() -> None:
    clock = Clock()
    bulkhead = make(max_in_flight=32, adaptive=True, clock=clock, min_in_flight=2)
    slots = [await bulkhead.acquire(A) for _ in range(32)]
    bulkhead.sample(0.05)  # the best so far
    for _ in range(40):  # the engine queues: first tokens take 4x as long
        clock.now += 1
        bulkhead.sample(0.2)
    assert bulkhead.limit == 2  # cut to the floor
    for slot in slots:
        slot.release()
    held = [await bulkhead.acquire(A) for _ in range(2)]
    waiting = await queued(bulkhead, A)  # over the limit now: it waits
    assert not waiting.done()
    for _ in range(4):
        bulkhead.sample(0.05)  # fast again, and the limit holds requests back: it grows
    assert bulkhead.limit > 3
    (await asyncio.wait_for(waiting, 1)).release()
    for slot in held:
        slot.release()


def test_a_callers_share_and_priority() -> None:
    team = KeyRecord(hash="ab" * 32, name="alice", tenant="research", weight=3)
    batch_key = KeyRecord(hash="cd" * 32, name="etl", priority="batch")
    call = Call(Caller(key=team), "r", never)
    assert share_of({}, call) == Share("team:research", 3, "interactive", "research")
    assert share_of({"weir": {"priority": "batch"}}, call).priority == "batch"
    batch_call = Call(Caller(key=batch_key), "r", never)
    assert share_of({"weir": {"priority": "interactive"}}, batch_call).priority == "batch"
    assert Call(Caller(key=team), "r", never, priority="batch").caller.share("batch").priority
    assert share_of({}, Call(Caller(static_key="x"), "r", never)).label == "static"
    with pytest.raises(InvalidRequest):
        share_of({"weir": {"priority": "urgent"}}, call)


def test_priority_scheduling_is_read_from_the_engine_arguments() -> None:
    assert _priority_scheduled(["--scheduling-policy", "priority"])
    assert _priority_scheduled(["--max-num-seqs", "8", "--scheduling-policy=priority"])
    assert not _priority_scheduled(["--scheduling-policy", "fcfs"])
