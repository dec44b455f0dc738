"""A client that stops reading a stream must not hold its engine slot for ever: after
``gateway.client_send_timeout_s`` without taking an event, the stream is closed as if the
client had left (the engine stream is closed, the slot and the reservation given back)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from starlette.types import Message

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import GatewayConfig, Settings
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.anyio
CHAT_PATH = "/v1/chat/completions"
CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


async def test_a_client_that_stops_reading_gives_its_slot_back() -> None:
    engine = FakeEngine(words=["word "] * 50)
    base = Settings()
    one_slot = [
        m.model_copy(update={"routing": m.routing.model_copy(update={"max_in_flight": 1,
                                                                     "max_queue": 0})})
        for m in base.models
    ]  # fmt: skip
    settings = Settings(gateway=GatewayConfig(client_send_timeout_s=0.3), models=one_slot)

    made: list[Fleet] = []

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        made.append(Fleet([replica], health_interval_s=0.05))
        return made[-1]

    app = create_app(settings, fleet_factory=fleet, counters={})
    stuck = asyncio.Event()  # never set: the client's receive window is full

    async def call(body: dict[str, Any], stops_reading: bool) -> list[Message]:
        raw = orjson.dumps(body)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)
            if stops_reading and message["type"] == "http.response.body" and len(sent) > 2:
                await stuck.wait()

        never = asyncio.Event().wait  # the client never hangs up
        await app(post_scope(CHAT_PATH, raw), body_then_leave(raw, never), send)
        return sent

    async with app.router.lifespan_context(app):
        assert await made[0].wait_ready(10)  # the first health round marked it healthy
        started = time.monotonic()
        sent = await asyncio.wait_for(call(CHAT | {"stream": True}, stops_reading=True), 5)
        took = time.monotonic() - started
        # bounded by the send timeout, not by the stream or engine (the promise is a time:
        # never before 0.3 s; the upper bound is generous, the stream never ends by itself)
        assert 0.3 <= took < 2.0
        assert sent[0]["status"] == 200
        assert sent[-1].get("more_body", False) is True  # cut, never finished
        assert engine.closed_streams == 1  # the engine stream was closed (vLLM aborts)
        again = await asyncio.wait_for(call(CHAT, stops_reading=False), 5)
        assert again[0]["status"] == 200  # the one slot came back
