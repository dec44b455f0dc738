"""Expired files' bytes removed from the batch store: every ``batches.sweep_s`` seconds.

A file is gone for its tenant from its ``expires_at`` on (the store's reads are given the
time); this is what frees the space. Each sweep deletes ``CHUNK`` files per store call, in
the store's worker thread (off the event loop), until none is left, so a large sweep does
not hold the store's one connection from requests for long. Files that an unfinished
batch reads are kept (``BatchStore.sweep``). Every gateway process sharing the store
sweeps it; a file deleted by one is simply not found by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from serving.batches.store import BatchStore

log = logging.getLogger("weir.batches")
CHUNK = 16  # files deleted per store call (each up to batches.max_file_bytes)


class Sweeper:
    def __init__(
        self, store: BatchStore, every_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.every_s = every_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Sweeper(every_s={self.every_s})"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="weir-batches-sweep")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        """Delete the files expired now; how many."""
        now = self.clock()
        deleted = 0
        while True:
            count = await self.store.sweep(now, CHUNK)
            deleted += count
            if count < CHUNK:
                return deleted

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                deleted = await self.sweep()
            except Exception:
                log.exception("could not remove expired files; trying again in %ss", self.every_s)
                continue
            if deleted:
                log.info("removed %d expired files", deleted)
