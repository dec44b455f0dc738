"""What a connection may cost before any key is checked: a bounded head, bounded time to
send it and the body, and a bounded number of connections per client address.

uvicorn's httptools protocol buffers a request's headers without limit and times out
only the idle time between keep-alive requests: five connections each sending a 20 MB
header held 82 MB, and a connection that sends nothing, or a byte a minute, was never
closed. ``GuardedHttpTools`` is that protocol with the missing bounds; it answers with
our error table's JSON (431 ``request_header_too_large``, 408 ``request_timeout``,
429 ``too_many_connections``) and closes the connection.

The limits are class settings, set by ``configure`` from ``gateway`` settings when the
app is made (in every worker process: ``--workers`` builds the app in each).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import HeaderTooLarge, RequestTimeout, TooManyConnections
from serving.http.rendering import raw_error
from serving.settings import GatewayConfig


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_per_client: int = 1024  # 0: no cap

    @classmethod
    def of(cls, gateway: GatewayConfig) -> ConnectionLimits:
        return cls(
            gateway.max_header_bytes,
            gateway.header_timeout_s,
            gateway.body_timeout_s,
            gateway.max_connections_per_client,
        )


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded in head size, time and connections."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    open_by_client: ClassVar[Counter[str]] = Counter()  # this process's connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None  # counted in open_by_client
        self._in_head = True  # the request's head is not complete yet
        self._head_bytes = 0  # raw bytes read while the head is incomplete
        self._reading = 0  # the size of the read being parsed
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        peer = self.client[0] if self.client else ""
        if limits.max_per_client and self.open_by_client[peer] >= limits.max_per_client:
            self._refuse(
                TooManyConnections(
                    f"This client address holds {limits.max_per_client} open connections,"
                    " the most allowed; reuse them (keep-alive) or close some."
                )
            )
            return
        self.open_by_client[peer] += 1
        self._peer = peer
        self._arm(limits.header_timeout_s, "headers")  # a connection that sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            left = self.open_by_client[self._peer] - 1
            if left > 0:
                self.open_by_client[self._peer] = left
            else:
                del self.open_by_client[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._reading = len(data)
        super().data_received(data)  # the parser starts the next request's head (on_message_begin)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(
                    HeaderTooLarge(
                        f"The request's headers are over {self.limits.max_header_bytes} bytes."
                    )
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            self._start_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        limit = self.limits.max_header_bytes
        if self._head_bytes + self._reading > limit and self._parsed_head() > limit:
            # the head completed within this read, so data_received never counted it whole
            self._refuse(HeaderTooLarge(f"The request's headers are over {limit} bytes."))
            return  # no cycle: the app never sees the request
        super().on_headers_complete()
        if not self.transport.is_closing():
            self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._arm(self.limits.header_timeout_s, "headers")

    def _parsed_head(self) -> int:
        """The head's size as parsed (its URL and headers), asked only when this read
        was big enough to hold a head over the limit."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _arm(self, after_s: float, part: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(after_s, self._expired, part, after_s)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, part: str, after_s: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if started:  # an answer is under way: no second status line, only the close
            self.transport.close()
            return
        self._refuse(RequestTimeout(f"The request's {part} did not arrive within {after_s} s."))

    def _refuse(self, error: Exception) -> None:
        self._disarm()
        self._refused = True
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's own answer is not sent after ours
            self.cycle.message_event.set()
        self.transport.write(raw_error(error))
        self.transport.close()


def configure(gateway: GatewayConfig) -> None:
    """Set the limits every new connection of this process gets."""
    GuardedHttpTools.limits = ConnectionLimits.of(gateway)
