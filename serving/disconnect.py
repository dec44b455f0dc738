"""Cancel work the moment the client goes away.

``until_disconnect`` waits on the ASGI ``receive`` channel (after the body is read, the
next message is ``http.disconnect``). ``run_or_cancel`` races an engine call against it;
``SSEResponse`` does the same for a stream, including while it waits for the first token,
and closes the stream generator so the engine connection is dropped at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.errors import ClientClosed

T = TypeVar("T")
log = logging.getLogger("weir.gateway")


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_or_cancel(work: Awaitable[T], receive: Receive) -> T:
    """``await work``, cancelled with ``ClientClosed`` the moment the client disconnects.

    The work runs in the caller's task; one watcher task waits on ``receive`` and cancels
    the caller only while the work is still pending (checked in the same thread, so an
    answer that is already in is never thrown away)."""
    caller = asyncio.current_task()
    assert caller is not None
    pending = True
    left = False

    async def watch() -> None:
        nonlocal left
        await until_disconnect(receive)
        if pending:
            left = True
            caller.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if left:
            caller.uncancel()
            raise ClientClosed(
                "The client closed the connection before the answer was ready."
            ) from None
        raise
    finally:
        pending = False
        watcher.cancel()


class SSEResponse(StreamingResponse):
    """Starlette's StreamingResponse, but it always watches for the client leaving.

    ``on_close`` runs last, however the response ended (even if the stream never started).
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(events, headers=headers, media_type="text/event-stream")
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The stream is pumped in this task; a watcher cancels it if the client leaves.
        caller = asyncio.current_task()
        assert caller is not None
        pumping = True
        left = False

        async def watch() -> None:
            nonlocal left
            await until_disconnect(receive)
            if pumping:
                left = True
                caller.cancel()

        watcher: asyncio.Future[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            watcher = asyncio.ensure_future(watch())
            await self._pump(send)
        except asyncio.CancelledError:
            if not left:
                raise
            caller.uncancel()  # the client left: this response is over, nothing else is
        except OSError as exc:
            log.info("stream write failed: %s", exc)
        finally:
            pumping = False
            if watcher is not None:
                watcher.cancel()
            await self.events.aclose()  # closes the engine stream if the pump did not finish
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
