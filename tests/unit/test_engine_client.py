"""``HttpEngine`` against real HTTP upstreams that misbehave on purpose.

Each upstream is a small aiohttp server on a free loopback port: the failures a vLLM
server can't be made to produce on demand (hang mid-stream, cut the connection, send
garbage) are scripted here, and the adapter must turn each into the right error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from models.engines.client import EngineTimeouts, HttpEngine
from models.errors import (
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
)
from serving.streaming import relay
from tests.redis_server import dead_port

pytestmark = pytest.mark.anyio
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = (  # compact, as the relay re-encodes every chunk
    b"data: "
    + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]})
    + b"\n\n"
)


async def serve(handler: Handler) -> AsyncGenerator[str, None]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # port 0: its own, no race for one
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def engine_for(
    handler: Handler, idle_s: float = 5.0
) -> tuple[AsyncGenerator[str, None], HttpEngine]:
    gen = serve(handler)
    url = await gen.__anext__()
    return gen, HttpEngine("test", url, EngineTimeouts(idle_s=idle_s, total_s=5.0))


VLLM_ERROR = orjson.dumps(
    {
        "error": {
            "message": "too long",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    }
)
VLLM_FLAT_ERROR = orjson.dumps(
    {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}
)


def status(code: int, body: bytes) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=code, body=body, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    ("handler", "error", "param"),
    [
        (status(400, VLLM_ERROR), EngineRejected, "max_tokens"),
        (status(400, VLLM_FLAT_ERROR), EngineRejected, None),
        (status(503, b"{}"), EngineOverloaded, None),
        (status(500, b"oops"), EngineFailed, None),
        (status(404, b'{"error": {"message": "no model"}}'), EngineFailed, None),
        (status(200, b"not json"), EngineFailed, None),
    ],
)  # fmt: skip
async def test_answers_map_to_errors(
    handler: Handler, error: type[Exception], param: str | None
) -> None:
    gen, engine = await engine_for(handler)
    try:
        with pytest.raises(error) as caught:
            await engine.complete("/v1/chat/completions", {"model": "m"})
        assert getattr(caught.value, "param", None) == param
    finally:
        await gen.aclose()


async def test_connection_refused_is_unavailable() -> None:
    with dead_port() as port:  # nothing listens there, nor can while the block runs
        engine = HttpEngine("gone", f"http://127.0.0.1:{port}", EngineTimeouts())
        with pytest.raises(EngineUnavailable):
            await engine.complete("/v1/chat/completions", {})
        assert await engine.health() is False


async def test_hang_before_answer_is_a_timeout() -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return web.Response()

    gen, engine = await engine_for(slow, idle_s=0.3)
    try:
        with pytest.raises(EngineTimeout):
            await engine.complete("/v1/chat/completions", {})
    finally:
        await gen.aclose()


async def stream_events(handler: Handler, idle_s: float = 5.0) -> list[bytes]:
    gen, engine = await engine_for(handler, idle_s=idle_s)
    try:
        stream = await engine.open_stream("/v1/chat/completions", {"stream": True})
        return [e async for e in relay(stream, lambda c: c, "rid")]
    finally:
        await gen.aclose()


async def test_stream_that_goes_quiet_ends_with_a_timeout_event() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(CHUNK)
        await asyncio.sleep(1.5)
        return response

    events = await stream_events(hang, idle_s=0.3)
    assert events[0] == CHUNK
    assert b'"code":"engine_timeout"' in events[-2]
    assert events[-1] == b"data: [DONE]\n\n"


async def test_stream_cut_mid_way_ends_with_an_error_event() -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(CHUNK)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # the engine process dies
        return response

    events = await stream_events(cut)
    assert events[0] == CHUNK
    assert b'"code":"engine_error"' in events[-2]
    assert events[-1] == b"data: [DONE]\n\n"


async def test_stream_refused_before_the_first_byte_raises() -> None:
    gen, engine = await engine_for(status(503, b"{}"))
    try:
        with pytest.raises(EngineOverloaded):
            await engine.open_stream("/v1/chat/completions", {})
    finally:
        await gen.aclose()


async def test_events_split_across_reads_are_reassembled() -> None:
    async def dribble(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        final = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        for piece in (
            CHUNK[:7],
            CHUNK[7:30],
            CHUNK[30:] + final[:5],
            final[5:],
            b"data: [DONE]\n\n",
        ):
            await response.write(piece)
            await asyncio.sleep(0.01)
        return response

    events = await stream_events(dribble)
    assert len(events) == 3
    assert events[0] == CHUNK
    assert events[-1] == b"data: [DONE]\n\n"
