"""A lean HTTP/1.1 client for one upstream: pooled keep-alive connections, httptools parsing.

The gateway's hot path is one POST to an engine per request. aiohttp's client spent
about 190 µs of CPU on each (its session, URL, cookie, timer and payload layers), a
fifth of the gateway's whole cost; this client spends about 45 µs (measured on this
project's 2-core machine against the mock engine; see ``bench/overhead.py``). It does
only what talking to a vLLM server needs: ``Content-Length`` request bodies, responses
with ``Content-Length``, chunked or read-until-close bodies (parsed by ``httptools``, the
parser uvicorn uses), keep-alive reuse, a connect timeout, an idle timeout between reads
and an overall deadline, and back-pressure on large bodies. Inference and health checks
both go through it.

Keep-alive: a pooled connection idle for ``keepalive_s`` (below the engine's own
keep-alive, 5 s for vLLM's uvicorn) is closed, never reused. A request on a reused
connection that ends before any byte of the response arrived (the server closed it as
the request went out) is sent again, once, on a fresh connection.

Fixed headers: every request carries the configured ones (``Authorization`` for an
engine behind ``--api-key`` or an ingress); a URL's ``user:password@`` becomes Basic
auth and never reaches the ``Host`` header.

Errors are this module's own (``UpstreamError`` and subclasses); ``models.engines.client``
translates them for the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools

HIGH_WATER = 1 << 20  # pause reading with this much body unread
LOW_WATER = 1 << 16
KEEPALIVE_S = 4.0  # default: under the 5 s after which vLLM (uvicorn) closes an idle connection
_REAP_SLACK_S = 0.05  # the reaper closes what expires this soon too (no timer per connection)
# set by the client itself; a configured header may not override them
RESERVED = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field name
_BAD_VALUE = re.compile(r"[\x00\r\n]")


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
        self.idle_since = 0.0
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
        self.received = False  # any byte of this response: a failure before it may be retried

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.received = True
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

    def __init__(
        self, pool: Upstream, conn: _Connection, idle_s: float, deadline: float, slot: bool
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._idle_s = idle_s
        self._deadline = deadline
        self._slot = slot
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
        self._pool.give_back(self._conn, self._slot)


def fixed_headers(base_url: str, headers: Mapping[str, str] = {}) -> list[tuple[str, str]]:
    """What every request to ``base_url`` carries besides its own: ``headers`` (checked),
    plus Basic auth from the URL's ``user:password@`` if it has one. ``ValueError`` for a
    name that is not a token, one the client sets itself (``RESERVED``), a value with a
    line break, or both userinfo and an ``Authorization`` header."""
    fixed: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not _TOKEN.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP field name")
        if name.lower() in RESERVED:
            raise ValueError(f"header {name!r} is set by the gateway itself")
        if _BAD_VALUE.search(value) or not value.isascii():
            raise ValueError(f"header {name!r}: a value must be ASCII without line breaks")
        fixed.append((name, value))
    parts = urlsplit(base_url)
    if parts.username is not None:
        if any(name.lower() == "authorization" for name, _ in fixed):
            raise ValueError("the URL has user:password@ and an Authorization header: give one")
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        fixed.append(("authorization", "Basic " + base64.b64encode(pair.encode()).decode()))
    return fixed


def without_userinfo(base_url: str) -> str:
    """``base_url`` minus any ``user:password@``: what may be shown or logged."""
    parts = urlsplit(base_url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class Upstream:
    """Keep-alive connections to one ``http(s)://[user:password@]host:port[/prefix]``."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        keepalive_s: float = KEEPALIVE_S,
        headers: Mapping[str, str] = {},
        limit: int = 1000,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {without_userinfo(base_url)!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.prefix = parts.path.rstrip("/").encode()
        host = parts.netloc.rpartition("@")[2].encode()  # never the userinfo
        self._head = b"host: %s\r\n" % host + b"".join(
            b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in fixed_headers(base_url, headers)
        )
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.idle: deque[_Connection] = deque()  # oldest first; reused newest first
        self._reaper: asyncio.TimerHandle | None = None
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
            b"POST %s%s HTTP/1.1\r\n%scontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n"
            % (self.prefix, path.encode(), self._head, len(body), extra)
        ) + body
        await self.slots.acquire()
        return await self._send(raw, idle_s, total_s, slot=True)

    async def get(self, path: str, *, timeout_s: float) -> Response:
        """A GET (the health check): outside the connection limit, so requests filling the
        pool never starve it; ``timeout_s`` bounds connecting and the response's head."""
        raw = b"GET %s%s HTTP/1.1\r\n%s\r\n" % (self.prefix, path.encode(), self._head)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._send(raw, timeout_s, timeout_s, slot=False)
        except TimeoutError:
            raise UpstreamTimeout(f"no answer within {timeout_s:g}s") from None

    async def _send(
        self, raw: bytes, idle_s: float, total_s: float | None, *, slot: bool
    ) -> Response:
        conn: _Connection | None = None
        try:
            conn = self._pooled()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            loop = conn.loop
            deadline = loop.time() + (total_s if total_s is not None else 1e9)
            try:
                await _exchange(conn, raw, idle_s, deadline)
            except ConnectionBroken:
                if not reused or conn.received:
                    raise
                # the server closed the idle connection as the request went out: it saw
                # nothing of it; once more on a new connection
                conn.close()
                conn = await self._connect()
                await _exchange(conn, raw, idle_s, deadline)
        except BaseException:
            if conn is not None:
                conn.close()
            if slot:
                self.slots.release()
            raise
        return Response(self, conn, idle_s, deadline, slot)

    def _pooled(self) -> _Connection | None:
        """The most recently used idle connection, if it is open and fresh enough."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.loop.time() - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()  # this one is too old, and those under it are older
            while idle:
                idle.pop().close()
        return None

    async def _connect(self) -> _Connection:
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

    def give_back(self, conn: _Connection, slot: bool = True) -> None:
        if conn.reusable():
            conn.begin()
            conn.idle_since = conn.loop.time()
            self.idle.append(conn)
            if self._reaper is None:
                self._reaper = conn.loop.call_at(conn.idle_since + self.keepalive_s, self._reap)
        else:
            conn.close()
        if slot:
            self.slots.release()

    def _reap(self) -> None:
        """Close the idle connections past ``keepalive_s`` (one timer for the pool)."""
        self._reaper = None
        idle = self.idle
        if not idle:
            return
        loop = idle[0].loop
        cutoff = loop.time() + _REAP_SLACK_S - self.keepalive_s
        while idle and idle[0].idle_since <= cutoff:
            idle.popleft().close()
        if idle:
            self._reaper = loop.call_at(idle[0].idle_since + self.keepalive_s, self._reap)

    def close(self) -> None:
        """Close the idle connections (those in use close when released)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _exchange(conn: _Connection, raw: bytes, idle_s: float, deadline: float) -> None:
    """Write the request; wait for the response's status and headers."""
    conn.begin()
    assert conn.transport is not None
    conn.transport.write(raw)
    while not conn.headers_done:
        if conn.error is not None:
            raise conn.error
        await conn.wait(min(idle_s, deadline - conn.loop.time()))
