"""``models.engines.h1`` against scripted raw-socket servers: framing, reuse, timeouts, faults."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from models.engines.h1 import (
    ConnectFailed,
    ConnectionBroken,
    Upstream,
    UpstreamTimeout,
    fixed_headers,
)
from tests.keepalive_server import OK, late_closer
from tests.redis_server import dead_port

pytestmark = pytest.mark.anyio
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


async def started(script_for: Callable[[Server], Script]) -> AsyncIterator[tuple[Server, str]]:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.script = script_for(server)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)  # its own port
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()


def keep_alive(server: Server, answer: bytes = OK) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer)
            await writer.drain()

    return script


async def test_sequential_requests_reuse_one_connection_and_frame_the_request() -> None:
    async for server, url in started(keep_alive):
        upstream = Upstream(url + "/prefix/", connect_timeout_s=1)
        for _ in range(5):
            response = await upstream.post("/v1/x", b'{"a":1}', [("traceparent", "t")], idle_s=1)
            body = await response.read()
            response.release()
            assert (response.status, body) == (200, b'{"ok":true}')
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /prefix/v1/x HTTP/1.1\r\n")
        assert b"content-length: 7" in head
        assert b"traceparent: t" in head
        assert body == b'{"a":1}'
        upstream.close()


async def test_chunked_and_read_until_close_bodies() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if server.connections == 1:
                writer.write(chunked)
                await writer.drain()
                await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
            await writer.drain()

        return run

    async for server, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        first = await upstream.post("/", b"{}", idle_s=1)
        pieces = [piece async for piece in first.iter_chunks()]
        first.release()
        assert b"".join(pieces) == b"hello world"
        second = await upstream.post("/", b"{}", idle_s=1)
        assert await second.read() == b"until the end"
        second.release()
        third = await upstream.post("/", b"{}", idle_s=1)  # the closed one is not reused
        assert await third.read() == b"until the end"
        third.release()
        assert server.connections == 2
        upstream.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()  # then close, as uvicorn does after its keep-alive timeout

        return run

    async for server, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        for _ in range(3):
            response = await upstream.post("/", b"{}", idle_s=1)
            assert await response.read() == b'{"ok":true}'
            response.release()
            await asyncio.sleep(0.05)  # the FIN arrives while the connection is idle
        assert server.connections == 3
        upstream.close()


async def test_refused_connection_is_connect_failed() -> None:
    with dead_port() as port:  # nothing listens there, nor can while the block runs
        upstream = Upstream(f"http://127.0.0.1:{port}", connect_timeout_s=1)
        for _ in range(3):
            with pytest.raises(ConnectFailed):
                await upstream.post("/", b"{}", idle_s=1)
    with pytest.raises(ValueError, match="not an http"):
        Upstream("unix:///tmp/x", connect_timeout_s=1)
    assert upstream.slots._value == 1000  # no slot leaked by the failures


async def test_idle_timeout_total_deadline_and_a_cut_body() -> None:
    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            body = await server.read_request(reader)
            if body == b"silent":
                await asyncio.sleep(5)
            elif body == b"drip":  # a byte every 0.1 s: never idle, but slow
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                for _ in range(100):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            else:  # promise 100 bytes, send 3, hang up
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                await writer.drain()

        return run

    async for _, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        with pytest.raises(UpstreamTimeout):
            await upstream.post("/", b"silent", idle_s=0.2)
        response = await upstream.post("/", b"drip", idle_s=1, total_s=0.5)
        with pytest.raises(UpstreamTimeout):
            await response.read()
        response.release()
        response = await upstream.post("/", b"cut", idle_s=1)
        with pytest.raises(ConnectionBroken):
            await response.read()
        response.release()
        assert not upstream.idle  # nothing half-read goes back to the pool
        assert upstream.slots._value == 1000


async def test_garbage_is_a_broken_connection() -> None:
    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"SPDY/9 banana\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1)

        return run

    async for _, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        with pytest.raises(ConnectionBroken):
            await upstream.post("/", b"{}", idle_s=1)


async def test_cancelled_request_closes_its_connection_and_frees_its_slot() -> None:
    """The server sees the connection end (EOF) when the caller cancels: that is what makes
    vLLM abort the request."""
    eof = asyncio.Event()

    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if await reader.read(1) == b"":  # waits for more bytes, or the client's EOF
                eof.set()

        return run

    async for _, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1, limit=1)
        task = asyncio.ensure_future(upstream.post("/", b"{}", idle_s=5))
        await asyncio.sleep(0.1)
        assert not eof.is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(eof.wait(), 2)  # the server saw the connection closed
        assert upstream.slots._value == 1
        assert not upstream.idle


async def test_a_large_body_is_read_with_back_pressure() -> None:
    size = 8 << 20

    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            for _ in range(size // 65536):
                writer.write(b"y" * 65536)
                await writer.drain()

        return run

    async for _, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        response = await upstream.post("/", b"{}", idle_s=2)
        seen = 0
        async for piece in response.iter_chunks():
            seen += len(piece)
            await asyncio.sleep(0)  # a consumer slower than loopback
        response.release()
        assert seen == size
        assert len(upstream.idle) == 1  # read to its end: reusable


async def test_the_connection_limit_queues_requests() -> None:
    async for server, url in started(keep_alive):
        upstream = Upstream(url, connect_timeout_s=1, limit=2)

        async def one(upstream: Upstream) -> bytes:
            response = await upstream.post("/", b"{}", idle_s=1)
            try:
                return await response.read()
            finally:
                response.release()

        answers = await asyncio.gather(*(one(upstream) for _ in range(10)))
        assert answers == [b'{"ok":true}'] * 10
        assert server.connections <= 2
        upstream.close()


async def ask(upstream: Upstream) -> bytes:
    response = await upstream.post("/", b"{}", idle_s=2)
    try:
        return await response.read()
    finally:
        response.release()


async def test_a_connection_idle_past_keepalive_is_never_reused() -> None:
    """The server drops a request on a connection idle > 0.5 s; ours expire after 0.2 s,
    so after 0.6 s idle the request goes out on a new connection and nothing is dropped."""
    async for server, url in late_closer(close_after_s=0.5):
        upstream = Upstream(url, connect_timeout_s=1, keepalive_s=0.2)
        assert await ask(upstream) == b'{"ok":true}'
        await asyncio.sleep(0.6)  # idle time is what is tested: longer than both limits
        assert await ask(upstream) == b'{"ok":true}'
        assert (server.connections, server.dropped) == (2, 0)
        upstream.close()


async def test_an_idle_connection_is_closed_when_its_keepalive_ends() -> None:
    async for server, url in late_closer(close_after_s=60):
        upstream = Upstream(url, connect_timeout_s=1, keepalive_s=0.2)
        assert await ask(upstream) == b'{"ok":true}'
        assert len(upstream.idle) == 1
        await asyncio.wait_for(server.eof.wait(), 5)  # we closed it, no request coming
        assert server.eofs == 1
        assert not upstream.idle
        assert await ask(upstream) == b'{"ok":true}'
        assert server.connections == 2
        upstream.close()


async def test_a_reused_connection_closed_under_the_request_is_retried_once() -> None:
    """Keep-alive longer than the server's: the reused connection is dropped before any
    byte of the answer; the request goes out once more on a new connection."""
    async for server, url in late_closer(close_after_s=0.2):
        upstream = Upstream(url, connect_timeout_s=1, keepalive_s=30)
        assert await ask(upstream) == b'{"ok":true}'
        await asyncio.sleep(0.4)  # idle past the server's limit, not ours
        assert await ask(upstream) == b'{"ok":true}'
        assert (server.connections, server.dropped) == (2, 1)
        assert upstream.slots._value == 1000
        upstream.close()


async def test_a_new_connection_closed_before_the_answer_is_not_retried() -> None:
    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)  # and close without a byte

        return run

    async for server, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        with pytest.raises(ConnectionBroken):
            await upstream.post("/", b"{}", idle_s=1)
        assert server.connections == 1
        assert upstream.slots._value == 1000


async def test_a_reused_connection_cut_after_bytes_of_the_answer_is_not_retried() -> None:
    def script(server: Server) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncont")  # part of a head, then gone
            await writer.drain()

        return run

    async for server, url in started(script):
        upstream = Upstream(url, connect_timeout_s=1)
        assert await ask(upstream) == b'{"ok":true}'
        with pytest.raises(ConnectionBroken):
            await upstream.post("/", b"{}", idle_s=1)
        assert server.connections == 1


async def test_fixed_headers_go_on_every_request_and_host_never_has_userinfo() -> None:
    async for server, url in started(keep_alive):
        port = url.rsplit(":", 1)[1]
        with_user = f"http://al%40ice:p%3Ass@127.0.0.1:{port}/base"
        upstream = Upstream(with_user, connect_timeout_s=1, headers={"X-Tenant": "t1"})
        await ask(upstream)
        health = await upstream.get("/health", timeout_s=1)
        assert (health.status, await health.read()) == (200, b'{"ok":true}')
        health.release()
        assert server.connections == 1  # the health check used the same pool
        basic = "Basic " + base64.b64encode(b"al@ice:p:ss").decode()
        for request in server.requests:
            head = request.split(b"\r\n\r\n")[0].decode().split("\r\n")
            fields = [tuple(line.split(": ", 1)) for line in head[1:]]
            assert ("host", f"127.0.0.1:{port}") in fields
            assert ("authorization", basic) in fields
            assert ("X-Tenant", "t1") in fields
            assert "al%40ice" not in "\n".join(head)
        assert server.requests[1].startswith(b"GET /base/health HTTP/1.1\r\n")
        upstream.close()


@pytest.mark.parametrize(
    ("url", "headers", "refusal"),
    [
        ("http://u:p@h:1", {"Authorization": "Bearer x"}, "give one"),
        ("http://h:1", {"Host": "evil"}, "set by the gateway"),
        ("http://h:1", {"content-length": "1"}, "set by the gateway"),
        ("http://h:1", {"X-A": "v\r\nX-Injected: 1"}, "line breaks"),
        ("http://h:1", {"Bad Name": "v"}, "not a valid HTTP field name"),
    ],
)
def test_fixed_headers_that_are_refused(url: str, headers: dict[str, str], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        fixed_headers(url, headers)
