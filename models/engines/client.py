"""The engine seam: the one adapter that speaks HTTP to a vLLM OpenAI server.

``Engine`` is the interface the gateway uses; ``HttpEngine`` implements it: requests and
health checks go over its own keep-alive pool (``models.engines.h1``, the lean client for
the hot path), with the version's fixed headers on each. Test fakes implement the same
Protocol.
Every client or asyncio exception is translated here into ``models.errors`` (chained
with ``from``).
The engine's JSON is passed on as parsed dicts; streams yield the raw payload of each
SSE event (``models.engines.sse``), so the gateway adds no re-framing work to each chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from opentelemetry import trace
from opentelemetry.propagate import inject

from models.engines.h1 import (
    KEEPALIVE_S,
    ConnectFailed,
    Response,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
    without_userinfo,
)
from models.engines.sse import EventTooLarge, SseParser
from models.errors import (
    EngineError,
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
)

JSON = dict[str, Any]


def json_bytes(obj: Any) -> bytes:
    """orjson for speed; the standard library for what orjson refuses (ints past 64 bits)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


def json_dumps(obj: Any) -> str:
    """``json_bytes`` as text (the app's aiohttp session serializer)."""
    return json_bytes(obj).decode()


class EngineStream(Protocol):
    """An open streaming response: iterate the SSE payloads, always ``aclose``."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    name: str

    async def complete(self, path: str, body: JSON) -> JSON: ...

    async def open_stream(self, path: str, body: JSON) -> EngineStream: ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EngineTimeouts:
    connect_s: float = 5.0
    idle_s: float = 120.0  # longest wait for the first byte or the next chunk
    total_s: float = 600.0  # whole non-streaming request
    health_s: float = 2.0
    keepalive_s: float = KEEPALIVE_S  # an idle pooled connection older than this is closed


class HttpEngine:
    """A vLLM OpenAI server at ``base_url``; ``headers`` go with every request to it.

    A ``user:password@`` in ``base_url`` becomes Basic auth; ``base_url`` as kept (shown on
    ``/weir/engines``, in logs) is without it, and ``headers`` are never shown.
    ``ValueError`` for a URL or headers ``h1.fixed_headers`` refuses."""

    def __init__(
        self,
        name: str,
        base_url: str,
        timeouts: EngineTimeouts,
        *,
        headers: Mapping[str, str] = {},
        max_connections: int = 1000,
    ) -> None:
        self.name = name
        self.base_url = without_userinfo(base_url.rstrip("/"))
        self._timeouts = timeouts
        self._upstream = Upstream(
            base_url.rstrip("/"),
            connect_timeout_s=timeouts.connect_s,
            keepalive_s=timeouts.keepalive_s,
            headers=headers,
            limit=max_connections,
        )

    def __repr__(self) -> str:
        return f"HttpEngine(name={self.name!r}, base_url={self.base_url!r})"

    async def complete(self, path: str, body: JSON) -> JSON:
        timeouts = self._timeouts
        try:
            response = await self._upstream.post(
                path, json_bytes(body), _trace(), idle_s=timeouts.idle_s, total_s=timeouts.total_s
            )
            try:
                raw = await response.read()
            finally:
                response.release()
        except UpstreamError as exc:
            raise self._transport_error(exc) from exc
        if response.status >= 400:
            raise self._status_error(response.status, raw)
        try:
            parsed: JSON = orjson.loads(raw)
        except ValueError as exc:
            raise EngineFailed("engine sent a body that is not JSON", engine=self.name) from exc
        return parsed

    async def open_stream(self, path: str, body: JSON) -> EngineStream:
        """POST and check the status before any byte reaches the client."""
        try:
            response = await self._upstream.post(
                path, json_bytes(body), _trace(), idle_s=self._timeouts.idle_s
            )
        except UpstreamError as exc:
            raise self._transport_error(exc) from exc
        if response.status >= 400:
            try:
                raw = await response.read()
            except UpstreamError as exc:
                raise self._transport_error(exc) from exc
            finally:
                response.release()
            raise self._status_error(response.status, raw)
        return _HttpStream(self, response)

    async def health(self) -> bool:
        """``GET /health`` answered 200 within ``health_s``, over the same pool."""
        try:
            response = await self._upstream.get("/health", timeout_s=self._timeouts.health_s)
            try:
                await response.read()
            finally:
                response.release()
        except UpstreamError:
            return False
        return response.status == 200

    async def aclose(self) -> None:
        """Close the idle pooled connections."""
        self._upstream.close()

    def _transport_error(self, exc: BaseException) -> EngineError:
        if isinstance(exc, UpstreamTimeout | asyncio.TimeoutError):
            return EngineTimeout(f"engine {self.name} did not answer in time", engine=self.name)
        if isinstance(exc, ConnectFailed):
            return EngineUnavailable(f"engine {self.name} refused the connection", engine=self.name)
        return EngineFailed(
            f"connection to engine {self.name} broke: {type(exc).__name__}", engine=self.name
        )

    def _status_error(self, status: int, raw: bytes) -> EngineError:
        message, param = _error_fields(raw)
        text = f"engine {self.name}: {message}" if message else f"engine {self.name}: HTTP {status}"
        if status == 503 or status == 429:
            return EngineOverloaded(text, engine=self.name)
        if 400 <= status < 500 and status != 404:
            return EngineRejected(message or text, status=status, param=param, engine=self.name)
        return EngineFailed(text, engine=self.name)


_NO_HEADERS: tuple[tuple[str, str], ...] = ()


def _trace() -> tuple[tuple[str, str], ...]:
    """W3C ``traceparent`` (and ``tracestate``) of the current span, for the engine."""
    if not trace.get_current_span().get_span_context().is_valid:
        return _NO_HEADERS  # tracing off: nothing to carry
    headers: dict[str, str] = {}
    inject(headers)
    return tuple(headers.items())


def _error_fields(raw: bytes) -> tuple[str, str | None]:
    """vLLM sends ``{"error": {...}}`` or a flat ``{"object": "error", ...}``."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "", None
    if not isinstance(body, dict):
        return "", None
    inner = body.get("error", body)
    if not isinstance(inner, dict):
        return str(inner), None
    param = inner.get("param")
    return str(inner.get("message") or ""), param if isinstance(param, str) else None


class _HttpStream:
    def __init__(self, engine: HttpEngine, response: Response) -> None:
        self._engine = engine
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        parser = SseParser()
        try:
            async for piece in self._response.iter_chunks():
                for payload in parser.feed(piece):
                    yield payload
            for payload in parser.end():
                yield payload
        except UpstreamError as exc:
            raise self._engine._transport_error(exc) from exc
        except EventTooLarge as exc:
            raise EngineFailed(
                f"engine {self._engine.name}: {exc}", engine=self._engine.name
            ) from exc

    async def aclose(self) -> None:
        # Read to its end, the connection goes back to the pool; else it is closed, which
        # is what makes vLLM abort the request.
        self._response.release()
