"""The stream's send deadline (``gateway.client_send_timeout_s``) counts only the time a
client takes to accept an event: one timer per stream, never the engine's pauses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest
from starlette.types import Message

from serving.http.rendering import SSEResponse, disconnected

pytestmark = pytest.mark.anyio
LIMIT = 0.2


async def paced(count: int, gap_s: float) -> AsyncGenerator[bytes, None]:
    for n in range(count):
        await asyncio.sleep(gap_s)
        yield b"data: %d\n\n" % n


async def never_leaves() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def run(events: AsyncGenerator[bytes, None], send_delay_s: float = 0.0) -> list[Message]:
    sent: list[Message] = []
    closed = asyncio.Event()

    async def send(message: Message) -> None:
        if send_delay_s and message["type"] == "http.response.body" and len(sent) == 3:
            await asyncio.sleep(send_delay_s)  # the client stops reading for a while
        sent.append(message)

    async def on_close() -> None:
        closed.set()

    left = disconnected(never_leaves)
    response = SSEResponse(events, left, on_close=on_close, send_timeout_s=LIMIT)
    try:
        await response({"type": "http"}, never_leaves, send)
    finally:
        left.close()
    assert closed.is_set()
    return sent


async def test_an_engine_pausing_longer_than_the_limit_is_not_cut() -> None:
    sent = await asyncio.wait_for(run(paced(3, gap_s=2.5 * LIMIT)), 5)
    bodies = [m["body"] for m in sent[1:]]
    assert bodies == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False


async def test_a_long_stream_of_quick_sends_outlives_the_limit() -> None:
    started = time.monotonic()
    sent = await asyncio.wait_for(run(paced(60, gap_s=LIMIT / 10)), 5)
    assert time.monotonic() - started > 2 * LIMIT  # the timer came round several times
    assert len(sent) == 62  # the start, 60 events, the end
    assert sent[-1]["more_body"] is False


async def test_a_send_slower_than_the_limit_ends_the_stream() -> None:
    started = time.monotonic()
    sent = await asyncio.wait_for(run(paced(1000, gap_s=0.001), send_delay_s=30), 5)
    took = time.monotonic() - started
    assert LIMIT <= took < LIMIT + 0.5
    assert sent[-1].get("more_body") is True  # cut, never finished
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_send_just_under_the_limit_passes() -> None:
    sent = await asyncio.wait_for(run(paced(5, gap_s=0.01), send_delay_s=LIMIT / 2), 5)
    assert len(sent) == 7
    assert sent[-1]["more_body"] is False
