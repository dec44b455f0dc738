"""Answers as HTTP: JSON bodies, SSE streams that watch for the client leaving, errors.

``respond`` turns the use case's ``Answer`` into a Starlette response; ``error_response``
and ``send_error`` render any exception through the one table (``serving.errors.render``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from functools import partial
from http import HTTPStatus
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from serving.core.answer import Answer, JsonAnswer
from serving.core.call import Disconnected
from serving.core.disconnect import DisconnectGuard, DisconnectSignal
from serving.errors import InvalidRequest, MethodNotAllowed, RouteNotFound, render

log = logging.getLogger("weir.gateway")


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def until_disconnect(receive: Receive) -> None:
    """After the body is read, the next message on ``receive`` is ``http.disconnect``."""
    while (await receive())["type"] != "http.disconnect":
        pass


def disconnected(receive: Receive) -> DisconnectSignal:
    """The request's one disconnect signal; the endpoint that made it closes it."""
    return DisconnectSignal(partial(until_disconnect, receive))


class SSEResponse(StreamingResponse):
    """Starlette's StreamingResponse, but it always watches for the client leaving.

    ``on_close`` is awaited last, however the response ended (even if the stream never
    started). ``disconnected`` is the request's signal, shared with the guard of the
    engine call before it; the endpoint that made it closes it.
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        disconnected: Disconnected,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        send_timeout_s: float | None = None,
    ) -> None:
        super().__init__(events, headers=headers, media_type="text/event-stream")
        self.events = events
        self.on_close = on_close
        self.send_timeout_s = send_timeout_s
        self.disconnected = disconnected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard: DisconnectGuard | None = None  # the stream is pumped in this task
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            guard = DisconnectGuard(self.disconnected)
            await self._pump(send)
        except asyncio.CancelledError:
            if guard is None or not guard.client_left():
                raise
            # the client left: this response is over, nothing else is
        except TimeoutError:
            # the client stopped reading: over, as if it had left (the connection is cut)
            log.info("client took no event for %ss: stream closed", self.send_timeout_s)
            if guard is not None:
                guard.client_left()  # takes back its cancel too, if it left meanwhile
        except OSError as exc:
            log.info("stream write failed: %s", exc)
        finally:
            if guard is not None:
                guard.disarm()
            await self.events.aclose()  # closes the engine stream if the pump did not finish
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        """Each event waits at most ``send_timeout_s`` for the client to take it (a client
        that stops reading exerts back-pressure; it must not hold the engine forever).
        Waiting for the engine is the engine's deadline, not this one."""
        limit = self.send_timeout_s
        if limit is None:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        watch = SendWatch(limit)
        try:
            async for event in self.events:
                watch.since = watch.loop.time()
                await send({"type": "http.response.body", "body": event, "more_body": True})
                watch.since = None
            watch.since = watch.loop.time()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watch.fired:
                watch.task.uncancel()
                raise TimeoutError from None
            raise
        finally:
            watch.stop()


class SendWatch:
    """One timer per stream for the send deadline (``asyncio.timeout`` rescheduled around
    every event cost two timers per event). ``since`` is when the send under way began
    (None between sends); the timer looks at it every ``limit`` seconds and cancels the
    task once a send has waited ``limit``, else sets itself for when the current send
    would reach it."""

    def __init__(self, limit: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("SendWatch needs a running task")
        self.task = task
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.since: float | None = None
        self.fired = False
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(
            self.loop.time() + limit, self._check
        )

    def _check(self) -> None:
        now = self.loop.time()
        since = self.since
        if since is not None and now - since >= self.limit:
            self.fired = True
            self._timer = None
            self.task.cancel()
            return
        self._timer = self.loop.call_at((now if since is None else since) + self.limit, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def respond(answer: Answer, disconnected: Disconnected, send_timeout_s: float | None) -> Response:
    if isinstance(answer, JsonAnswer):
        return JSONBytes(answer.body, status_code=answer.status, headers=answer.headers)
    return SSEResponse(
        answer.events, disconnected, headers=answer.headers, on_close=answer.on_close,
        send_timeout_s=send_timeout_s,
    )  # fmt: skip


def as_ours(exc: Exception, scope: Scope) -> Exception:
    """Starlette's own HTTP errors as ours (404, 405, else a 400 with their detail);
    every other error as it is."""
    if not isinstance(exc, HTTPException):
        return exc
    if exc.status_code == 404:
        return RouteNotFound(f"No route {scope['method']} {scope['path']}.")
    if exc.status_code == 405:
        return MethodNotAllowed(
            f"Method {scope['method']} is not allowed on {scope['path']}.",
            allow=_allowed(exc, scope),
        )
    return InvalidRequest(str(exc.detail) or "Bad request.")


def _allowed(exc: HTTPException, scope: Scope) -> list[str]:
    """The methods the path accepts. Starlette's ``Allow`` names those of the first route
    that matched the path only, and FastAPI makes a route per method (``GET`` and ``POST``
    of one path are two): so every route of the app's router that matches the path but
    not the method adds its own (an error path: the routes are walked only here)."""
    methods = {m for m in (exc.headers or {}).get("Allow", "").split(", ") if m}
    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        if isinstance(route, Route) and route.matches(scope)[0] is Match.PARTIAL:
            methods |= route.methods or set()
    return sorted(methods)


def error_response(exc: BaseException, request_id: str) -> Response:
    status, body, headers = render(exc, request_id)
    return JSONBytes(body, status_code=status, headers=headers)


def raw_error(exc: BaseException) -> bytes:
    """A whole HTTP/1.1 error response that closes its connection: for the connection
    guard, which answers before any ASGI app (or request id) exists."""
    status, body, headers = render(exc, "")
    raw = orjson.dumps(body)
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(raw)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


async def send_error(send: Send, exc: BaseException, request_id: str) -> None:
    status, body, headers = render(exc, request_id)
    raw = orjson.dumps(body)
    header_list = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    header_list += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})
