"""A request as the use cases see it: who asks, under which id, with which options.

The edge (``serving.http``) builds a ``Call`` from the HTTP request; nothing below it
reads headers, ``receive`` or Starlette state. The trace context travels the way
OpenTelemetry carries it, in the current context (the edge opens the server span).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serving.keys.records import KeyRecord
from serving.routing.bulkhead import Priority, Share

Disconnected = Callable[[], Awaitable[None]]  # resolves when the client has gone away


async def never() -> None:
    """A client that never leaves (internal callers: RAG's embeddings, tests)."""
    await asyncio.Event().wait()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a key from the store, a static key (by its short hash), or nobody."""

    key: KeyRecord | None = None
    static_key: str | None = None

    @property
    def key_id(self) -> str:
        return self.key.id if self.key is not None else "-"

    @property
    def tenant(self) -> str:
        """Whose collections and documents these are (RAG, ``/v1/collections``)."""
        if self.key is not None:
            return f"key:{self.key.id}"
        return f"static:{self.static_key}" if self.static_key else "anonymous"

    @property
    def cache_scope(self) -> str:
        """Whose cached answers this request may see."""
        if self.key is not None:
            return self.key.cache_scope
        return f"static:{self.static_key}" if self.static_key else "anonymous"

    def allows(self, model: str) -> bool:
        return self.key is None or self.key.allows(model)

    def share(self, asked: Priority | None = None) -> Share:
        """Its place in fair queueing: its tenant (the key's team, else the key), weight
        and label, at the lower of its key's priority and the one ``asked``."""
        key = self.key
        priority: Priority = "batch" if "batch" in (asked, key and key.priority) else "interactive"
        if key is None:
            label = "static" if self.static_key else "anonymous"
            return Share(self.tenant, 1.0, priority, label)
        if key.tenant:
            return Share(f"team:{key.tenant}", key.weight, priority, key.tenant)
        return Share(self.tenant, key.weight, priority, key.name)


ANONYMOUS = Caller()


@dataclass(frozen=True, slots=True)
class Call:
    caller: Caller
    request_id: str
    disconnected: Disconnected
    pin: str | None = None  # serve this version of the model (``x-weir-model-version``)
    cache_control: str | None = None  # ``x-weir-cache``: bypass, refresh or nothing
    priority: Priority | None = None  # batch: the Batch API's requests (lowers, never raises)
    body_bytes: int | None = None  # the request body's size: its prompt has no more characters
