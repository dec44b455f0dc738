"""What the use cases give back to the edge, and what every answer path shares.

``Proxy.handle`` returns an ``Answer``: a ``JsonAnswer`` (a body and headers) or a
``StreamAnswer`` (SSE events, headers and what to await when the stream is over, however
it ended). Only ``serving.http`` turns them into HTTP responses.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

VERSION_HEADER = "x-weir-model-version"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(slots=True)
class JsonAnswer:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(slots=True)
class StreamAnswer:
    """SSE events; ``on_close`` is awaited last, however the stream ended, even if it was
    never sent (the events generator then never ran, so it closed nothing)."""

    events: AsyncGenerator[bytes, None]
    headers: dict[str, str] = field(default_factory=dict)
    on_close: Callable[[], Awaitable[None]] | None = None


Answer = JsonAnswer | StreamAnswer


def total_tokens(answer: dict[str, Any], fallback: int) -> int:
    """What the engine says the request used; ``fallback`` if it does not say."""
    usage = answer.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else fallback
