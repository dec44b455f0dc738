"""What lies between the gateway and a remote engine: an ingress that wants a key, a
proxy that reframes the stream with CRLF, keep-alive closes that race our requests.

The engine here is a real HTTP server (aiohttp) that answers like vLLM's OpenAI server
but only with the configured ``Authorization`` (401 and an unhealthy ``/health``
without it), and streams CRLF-framed events; the gateway is built from configuration
(``[[models.versions]] url`` and ``headers``), as ``weir serve`` builds it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from models.config import ModelConfig, VersionConfig
from models.engines.client import EngineTimeouts, HttpEngine
from models.engines.launcher import free_port
from models.errors import EngineFailed
from serving.http.app import create_app
from serving.settings import Settings, load_settings
from tests.keepalive_server import late_closer

pytestmark = pytest.mark.anyio
SECRET = "Bearer s3cret-engine-key"
CHAT = {"model": "remote", "messages": [{"role": "user", "content": "Hi"}]}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "remote",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }  # fmt: skip


class Ingress:
    """A vLLM-shaped engine behind an ingress that wants ``SECRET``; records each head."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # path, Host, Authorization

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.host, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != SECRET:
            return web.json_response({"error": {"message": "no key", "code": 401}}, status=401)
        if request.path == "/health":
            return web.Response()
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": []})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        role = orjson.dumps(chunk({"role": "assistant", "content": "Hel"}))
        # a proxy's CRLF framing, a comment, and one event's JSON over two data lines
        await response.write(b": proxied\r\n\r\ndata: " + role + b"\r\n\r\n")
        last = orjson.dumps(chunk({"content": "lo"}, finish="stop")).decode()
        cut = last.index('"choices"')
        await response.write(f"data: {last[:cut]}\r\ndata: {last[cut:]}\r\n\r\n".encode())
        await response.write(b"data: [DONE]\r\n\r\n")
        return response


async def ingress() -> AsyncIterator[tuple[Ingress, int]]:
    engine = Ingress()
    runner = web.AppRunner(engine.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield engine, port
    finally:
        await runner.cleanup()


def settings_for(version: VersionConfig) -> Settings:
    model = ModelConfig(name="remote", task="chat", current=version.version, versions=[version])
    return Settings(models=[model])


async def ready(client: httpx.AsyncClient) -> None:
    for _ in range(200):  # 10 s
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the engine never became healthy")


async def test_configured_headers_reach_the_engine_on_inference_and_health(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async for engine, port in ingress():
        version = VersionConfig(
            version="r", url=f"http://127.0.0.1:{port}", headers={"Authorization": SECRET}
        )
        app = create_app(settings_for(version), counters={})
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://gw") as client,
        ):
            await ready(client)  # only if /health got the key
            answer = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert answer.status_code == 200
        events = [line for line in answer.text.split("\n\n") if line]
        payloads = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert [p["choices"][0]["delta"].get("content") for p in payloads] == ["Hel", "lo"]
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
        assert events[-1] == "data: [DONE]"
        paths = {path for path, _, _ in engine.seen}
        assert {"/health", "/v1/chat/completions"} <= paths
        assert all(auth == SECRET for _, _, auth in engine.seen)
    assert not [r for r in caplog.records if "s3cret" in r.getMessage()]


async def test_userinfo_in_the_url_is_basic_auth_and_never_the_host_header() -> None:
    async for engine, port in ingress():
        timeouts = EngineTimeouts(health_s=2)
        engine_client = HttpEngine("e", f"http://al%40ice:pw@127.0.0.1:{port}", timeouts)
        assert await engine_client.health() is False  # an ingress wanting a Bearer key
        await engine_client.aclose()
        basic = "Basic " + base64.b64encode(b"al@ice:pw").decode()
        assert engine.seen == [("/health", f"127.0.0.1:{port}", basic)]
        assert engine_client.base_url == f"http://127.0.0.1:{port}"  # shown, logged: no pw
        assert "pw" not in repr(engine_client)


def test_a_config_with_both_userinfo_and_authorization_is_refused_without_echoing_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "weir.toml"
    config.write_text(
        '[[models]]\nname = "m"\ntask = "chat"\ncurrent = "v"\n'
        '[[models.versions]]\nversion = "v"\nurl = "http://u:hunter2@gpu:8000"\n'
        'headers = { Authorization = "Bearer s3cret" }\n'
    )
    with pytest.raises(ValidationError) as refused:
        load_settings(config)
    text = str(refused.value)
    assert "version 'v': the URL has user:password@ and an Authorization header" in text
    assert "s3cret" not in text
    assert "hunter2" not in text
    with pytest.raises(ValidationError, match="line breaks"):
        VersionConfig(version="v", url="http://gpu:8000", headers={"X-A": "a\r\nHost: evil"})
    with pytest.raises(ValidationError, match="set by the gateway"):
        VersionConfig(version="v", dns="engines:8000", headers={"Host": "evil"})
    shown = repr(VersionConfig(version="v", url="http://gpu:8000", headers={"X-Key": "s3cret"}))
    assert "s3cret" not in shown


async def test_a_keepalive_close_racing_a_request_is_not_an_engine_fault() -> None:
    """The engine closes connections idle for 0.2 s as a request arrives on one: with our
    keep-alive longer than that, the request is retried once on a new connection; with the
    default (shorter than the engine's), no request goes out on a stale connection."""
    async for server, url in late_closer(close_after_s=0.2):
        racing = HttpEngine("e", url, EngineTimeouts(keepalive_s=30))
        for _ in range(3):
            assert await racing.complete("/v1/x", {}) == {"ok": True}
            await asyncio.sleep(0.3)  # idle time is what is tested: past the engine's 0.2 s
        assert await racing.health() is True
        assert server.dropped == 3  # each reuse raced the close, and none became a fault
        await racing.aclose()
    async for server, url in late_closer(close_after_s=0.5):
        expiring = HttpEngine("e", url, EngineTimeouts(keepalive_s=0.2))
        for _ in range(3):
            assert await expiring.complete("/v1/x", {}) == {"ok": True}
            await asyncio.sleep(0.6)  # past both: ours expires first
        assert (server.dropped, server.connections) == (0, 3)
        await expiring.aclose()


async def test_a_stream_whose_event_never_ends_is_an_engine_error() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        piece = b"data: " + b"x" * (1 << 20)
        for _ in range(20):  # 20 MiB, no blank line
            await response.write(piece)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        engine = HttpEngine("e", f"http://127.0.0.1:{port}", EngineTimeouts())
        stream = await engine.open_stream("/v1/chat/completions", {})
        with pytest.raises(EngineFailed, match="an event longer than"):
            async for _ in stream:
                pass
        await stream.aclose()
    finally:
        await runner.cleanup()
