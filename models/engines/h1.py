"""A lean HTTP/1.1 client for one upstream: pooled keep-alive connections, httptools parsing.

The gateway's hot path is one POST to an engine per request. aiohttp's client spent
about 190 µs of CPU on each (its session, URL, cookie, timer and payload layers), a
fifth of the gateway's whole cost; this client spends about 45 µs (measured on this
project's 2-core machine against the mock engine; see ``bench/overhead.py``). It does
only what talking to a vLLM server needs: ``Content-Length`` request bodies, responses
with ``Content-Length``, chunked or read-until-close bodies (parsed by ``httptools``, the
parser uvicorn uses), keep-alive reuse, a connect timeout, an idle timeout between reads
and an overall deadline, and back-pressure on large bodies. Health checks and the
rest still use aiohttp.

Errors are this module's own (``UpstreamError`` and subclasses); ``models.engines.client``
translates them for the gateway.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 20  # pause reading with this much body unread
LOW_WATER = 1 << 16


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """Refused, unreachable, or the name does not resolve."""


class UpstreamTimeout(UpstreamError):
    """No connection, or no bytes, within the allowed time."""


class ConnectionBroken(UpstreamError):
    """The connection closed or broke before the response was complete."""


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.delimited = False  # Content-Length or chunked: the end is known without EOF
        self.keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ConnectionBroken(f"unparsable response: {exc}")
            self.close()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self.delimited:
            self.complete = True  # a body that runs until the connection closes
        elif not self.complete and self.error is None:
            self.error = ConnectionBroken(
                f"connection closed mid-response ({type(exc).__name__ if exc else 'EOF'})"
            )
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only right inside this callback
        self._wake()

    # used by the pool and the response
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until the next parser event (or the connection ends); ``UpstreamTimeout`` after
        ``timeout_s`` without one."""
        if timeout_s <= 0:
            raise UpstreamTimeout("no answer before the deadline")
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes:
        """Everything received of the body so far (and reading resumes if it was paused)."""
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.error is None and self.keep_alive

    def begin(self) -> None:
        self._reset()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("no bytes from the upstream in time"))


class Response:
    """An upstream response whose status and headers are in; the body is read from it.

    ``release()`` always (idempotent): the connection goes back to the pool when the
    response was read to its end, else it is closed (what makes vLLM abort a request)."""

    def __init__(self, pool: Upstream, conn: _Connection, idle_s: float, deadline: float) -> None:
        self._pool = pool
        self._conn = conn
        self._idle_s = idle_s
        self._deadline = deadline
        self._released = False
        self.status = conn.status
        self.headers = conn.headers

    def _timeout(self) -> float:
        return min(self._idle_s, self._deadline - self._conn.loop.time())

    async def read(self) -> bytes:
        conn = self._conn
        parts: list[bytes] = []
        while True:
            if conn.chunks:
                parts.append(conn.take())
            if conn.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._timeout())

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (no deadline but the idle timeout between them)."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._idle_s)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool.give_back(self._conn)


class Upstream:
    """Keep-alive connections to one ``http(s)://host:port[/prefix]``."""

    def __init__(self, base_url: str, *, connect_timeout_s: float, limit: int = 1000) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = parts.netloc.encode()
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(limit)

    async def post(
        self,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]] = (),
        *,
        idle_s: float,
        total_s: float | None = None,
    ) -> Response:
        """Send the request and wait for the response's status and headers."""
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
        raw = (
            b"POST %s%s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n"
            % (self.prefix, path.encode(), self.host_header, len(body), extra)
        ) + body
        await self.slots.acquire()
        conn: _Connection | None = None
        try:
            conn = await self._connection()
            loop = conn.loop
            deadline = loop.time() + (total_s if total_s is not None else 1e9)
            conn.begin()
            assert conn.transport is not None
            conn.transport.write(raw)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(min(idle_s, deadline - loop.time()))
        except BaseException:
            if conn is not None:
                conn.close()
            self.slots.release()
            raise
        return Response(self, conn, idle_s, deadline)

    async def _connection(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            raise UpstreamTimeout(f"no connection within {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return conn

    def give_back(self, conn: _Connection) -> None:
        if conn.reusable():
            conn.begin()
            self.idle.append(conn)
        else:
            conn.close()
        self.slots.release()

    def close(self) -> None:
        """Close the idle connections (those in use close when released)."""
        for conn in self.idle:
            conn.close()
        self.idle.clear()
