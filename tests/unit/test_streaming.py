"""Streams end with finish_reason then [DONE], or with an error event then [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from models.errors import EngineTimeout
from serving.streaming import DONE, relay
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate

pytestmark = pytest.mark.anyio


def identity(chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk


async def collect(events: AsyncIterator[bytes]) -> list[bytes]:
    return [e async for e in events]


def payloads(events: list[bytes]) -> list[Any]:
    out = []
    for raw in events:
        assert raw.startswith(b"data: ")
        assert raw.endswith(b"\n\n")
        body = raw[6:-2]
        out.append(body.decode() if body == b"[DONE]" else orjson.loads(body))
    return out


async def test_normal_stream_passes_through_and_ends_with_done() -> None:
    engine = FakeEngine(words=["a", "b", "c"])
    stream = await engine.open_stream("/v1/chat/completions", {"model": "m"})
    events = await collect(relay(stream, identity, "r1"))
    got = payloads(events)
    assert got[-1] == "[DONE]"
    assert [c["choices"][0]["delta"].get("content") for c in got[1:4]] == ["a", "b", "c"]
    assert got[3]["choices"][0]["finish_reason"] == "stop"
    assert got[4]["usage"]["completion_tokens"] == 3
    assert engine.closed_streams == 1


async def test_engine_dying_mid_stream_gives_error_event_then_done() -> None:
    engine = FakeEngine(words=["a", "b", "c"], die_after=1)
    stream = await engine.open_stream("/v1/chat/completions", {"model": "m"})
    got = payloads(await collect(relay(stream, identity, "r2")))
    assert got[-1] == "[DONE]"
    error = got[-2]
    validate("ErrorResponse", error)
    assert error["error"]["code"] == "engine_error"
    assert engine.closed_streams == 1


async def test_stream_that_just_stops_is_reported() -> None:
    engine = FakeEngine(words=["a"], end_without_done=True)
    stream = await engine.open_stream("/v1/chat/completions", {"model": "m"})
    got = payloads(await collect(relay(stream, identity, "r3")))
    assert got[-2]["error"]["code"] == "engine_error"
    assert got[-1] == "[DONE]"


class ScriptedStream:
    def __init__(self, items: list[bytes | Exception]) -> None:
        self.items = items
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        for item in self.items:
            if isinstance(item, Exception):
                raise item
            yield item

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("items", "code"),
    [
        (
            [b'{"choices": [{"index": 0, "delta": {}, "finish_reason": null}]}', b"[DONE]"],
            "engine_error",
        ),
        ([b"not json"], "engine_error"),
        ([b'{"error": {"message": "bad", "code": 400}}'], "invalid_request"),
        ([b'{"object": "error", "message": "oops", "code": 500}'], "engine_error"),
        ([EngineTimeout("idle")], "engine_timeout"),
        ([RuntimeError("bug")], "internal_error"),
    ],
)
async def test_every_failure_ends_with_an_error_event(items: list[Any], code: str) -> None:
    stream = ScriptedStream(items)
    events = await collect(relay(stream, identity, "r4"))
    assert events[-1] == DONE
    error = payloads(events)[-2]
    assert error["error"]["code"] == code
    assert stream.closed
