"""Concurrent searches of one index, sent to FAISS as one batch.

FAISS answers a batch of queries far faster per query than the same queries one at a
time (a flat index is read from memory once for the whole batch instead of once per
query; on a GPU, one kernel launch). ``SearchBatcher.search`` queues a query; one task
per batcher takes whatever is queued (after waiting at most ``window_s`` for more, never
past ``max_batch``), runs it as one search in a thread, and hands each caller its own
rows. Queries that arrive while a batch runs make up the next one, so under load batches
form without any wait, and a lone query waits at most ``window_s``.

Each caller's answer is the top ``k`` it asked for: the batch searches for the largest
``k`` in it and each row is cut to its own (FAISS's top-k lists are prefixes of one
another), so per-request results are those of a search on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Waiting:
    vector: np.ndarray
    k: int
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]


class SearchBatcher:
    def __init__(self, search: Search, *, window_s: float = 0.001, max_batch: int = 64) -> None:
        self._search = search
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: list[_Waiting] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # how many searches reached FAISS (for tests and the bench)

    def __repr__(self) -> str:
        return f"SearchBatcher(window_s={self.window_s}, max_batch={self.max_batch})"

    async def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of one query (shape 1 x k), best first, as ``search`` gives."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(np.asarray(vector, dtype=np.float32).reshape(-1), k,
                           loop.create_future())  # fmt: skip
        self._queue.append(waiting)
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await waiting.future

    async def _run(self) -> None:
        while self._queue:
            if self.window_s > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.window_s)  # the bounded wait for company
            batch = [w for w in self._queue[: self.max_batch] if not w.future.done()]
            del self._queue[: self.max_batch]
            if not batch:
                continue
            k = max(w.k for w in batch)
            try:
                self.batches += 1
                scores, ids = await asyncio.to_thread(
                    self._search, np.stack([w.vector for w in batch]), k
                )
            except Exception as exc:
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            for row, w in enumerate(batch):
                if not w.future.done():
                    w.future.set_result((scores[row : row + 1, : w.k], ids[row : row + 1, : w.k]))
