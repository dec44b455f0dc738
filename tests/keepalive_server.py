"""A keep-alive HTTP/1.1 server that closes idle connections the racy way, for the tests
of the engine client's connection reuse (``models.engines.h1``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from models.engines.launcher import free_port

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


class LateCloser:
    """A keep-alive server whose idle close crosses the next request: a request that
    arrives on a connection idle for longer than ``close_after_s`` is dropped (the
    connection closes without a byte of answer), as when the engine's keep-alive timer
    fires while our request is on the wire. Counts connections, drops and EOFs."""

    def __init__(self, close_after_s: float) -> None:
        self.close_after_s = close_after_s
        self.connections = 0
        self.dropped = 0
        self.eofs = 0
        self.eof = asyncio.Event()
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if loop.time() - idle_since > self.close_after_s:
                    self.dropped += 1
                    return
                self.heads.append(head)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                writer.write(OK)
                await writer.drain()
                idle_since = loop.time()
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                self.eofs += 1  # the client closed the connection between requests
                self.eof.set()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def late_closer(close_after_s: float) -> AsyncIterator[tuple[LateCloser, str]]:
    server = LateCloser(close_after_s)
    port = free_port()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()
