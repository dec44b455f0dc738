"""A client that goes away cancels the engine call at once, streamed or not."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import orjson
import pytest
from starlette.types import Message

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.core.call import never
from serving.core.disconnect import DisconnectSignal, run_or_cancel
from serving.errors import ClientClosed
from serving.http.app import create_app
from serving.settings import Settings
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.anyio


async def call_and_leave(
    engine: FakeEngine, body: dict[str, Any], leave_after_s: float
) -> list[Message]:
    """Drive the ASGI app directly: send the body, then disconnect after a while."""

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    app = create_app(Settings(), fleet_factory=fleet, counters={})
    raw = orjson.dumps(body)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    receive = body_then_leave(raw, lambda: asyncio.sleep(leave_after_s))
    scope = post_scope("/v1/chat/completions", raw)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


async def test_non_streaming_call_is_cancelled_on_disconnect() -> None:
    engine = FakeEngine(hang_s=30)
    started = time.monotonic()
    await call_and_leave(engine, CHAT, leave_after_s=0.2)
    # a time on purpose: ended when the client left, not when the engine's 30 s hang did
    # (a bound ten times under that); the cancellation itself is counted below
    assert time.monotonic() - started < 3
    assert engine.cancelled == 1


async def test_stream_waiting_for_first_token_is_cancelled_on_disconnect() -> None:
    engine = FakeEngine(first_chunk_delay_s=30)
    started = time.monotonic()
    sent = await call_and_leave(engine, CHAT | {"stream": True}, leave_after_s=0.2)
    assert time.monotonic() - started < 3  # not the engine's 30 s (as above)
    # the response starts with the first token: before it, leaving is a 499 nobody reads
    assert sent[0]["status"] == 499
    assert engine.cancelled == 1
    assert engine.closed_streams == 1


async def test_a_finished_stream_is_closed_once() -> None:
    engine = FakeEngine()
    sent = await call_and_leave(engine, CHAT | {"stream": True}, leave_after_s=10)
    bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert bodies.endswith(b"data: [DONE]\n\n")
    assert sent[-1]["more_body"] is False
    assert engine.closed_streams == 1
    assert engine.cancelled == 0


async def test_the_guard_leaves_no_garbage_cycles() -> None:
    """Every request arms a guard: one left in a reference cycle per request made the
    cyclic GC's pauses show as tens of milliseconds on the p99 under load."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def disconnected() -> None:
        await never

    async def work() -> int:
        await asyncio.sleep(0)  # the watcher starts and waits on receive
        await asyncio.sleep(0)
        return 1

    before = asyncio.all_tasks()
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            assert await run_or_cancel(work(), disconnected) == 1
        for _ in range(1000):  # polled: the cancelled watchers have finished
            if not asyncio.all_tasks() - before:
                break
            await asyncio.sleep(0)
        assert not asyncio.all_tasks() - before
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_a_stream_cut_midway_closes_the_engine_stream() -> None:
    engine = FakeEngine(words=["word "] * 20, hold_before_done=asyncio.Event())  # never set
    sent = await call_and_leave(engine, CHAT | {"stream": True}, leave_after_s=0.3)
    assert sent[0]["status"] == 200
    bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"word" in bodies
    assert not bodies.endswith(b"data: [DONE]\n\n")  # cut, never finished
    assert engine.closed_streams == 1


async def test_guards_in_turn_share_one_reader_of_the_channel() -> None:
    reads = 0
    leave = asyncio.Event()

    async def wait() -> None:
        nonlocal reads
        reads += 1
        await leave.wait()

    signal = DisconnectSignal(wait)

    async def quick() -> int:
        await asyncio.sleep(0)
        return 1

    assert await run_or_cancel(quick(), signal) == 1  # the engine call's guard
    assert await run_or_cancel(quick(), signal) == 1  # the stream's guard
    assert reads == 1
    leave.set()  # the client leaves while no guard is armed
    await asyncio.sleep(0.01)
    with pytest.raises(ClientClosed):  # the next guard learns it at once
        await asyncio.wait_for(run_or_cancel(asyncio.sleep(30), signal), 2)
    assert reads == 1
    signal.close()


async def test_close_stops_the_reader_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    signal = DisconnectSignal(asyncio.Event().wait)  # a client that never leaves

    async def quick() -> int:
        await asyncio.sleep(0)
        return 1

    assert await run_or_cancel(quick(), signal) == 1
    assert len(asyncio.all_tasks() - before) == 1  # the reader
    signal.close()
    for _ in range(100):
        if not asyncio.all_tasks() - before:
            break
        await asyncio.sleep(0)
    assert not asyncio.all_tasks() - before


async def test_the_shared_signal_leaves_no_garbage_cycles() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 1

    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            signal = DisconnectSignal(asyncio.Event().wait)
            assert await run_or_cancel(work(), signal) == 1
            assert await run_or_cancel(work(), signal) == 1
            signal.close()
        for _ in range(3):
            await asyncio.sleep(0)  # the cancelled readers finish
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_an_internal_caller_that_never_leaves_starts_no_watcher() -> None:
    before = asyncio.all_tasks()
    during: list[int] = []

    async def work() -> int:
        during.append(len(asyncio.all_tasks() - before))
        await asyncio.sleep(0)
        return 1

    assert await run_or_cancel(work(), never) == 1
    assert during == [0]  # RAG's embeddings and the Batch API's lines: no task per call
    assert not asyncio.all_tasks() - before
