"""Driving the gateway's ASGI app directly: a POST's scope, and a client that sends its
body and then leaves when it is told to (or never)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive


def post_scope(path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": b"", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("t", 80),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    }  # fmt: skip


def body_then_leave(body: bytes, leave: Callable[[], Awaitable[Any]]) -> Receive:
    """``receive`` for a client that sends ``body``, then disconnects once ``leave()`` is
    done (``asyncio.Event().wait`` for a client that never leaves)."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await leave()
        return {"type": "http.disconnect"}

    return receive
