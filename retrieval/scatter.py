"""The gateway's side of sharded search: scatter a query to the owner of each shard,
gather their top-k lists and merge them.

Owners come from ``shard_owners`` in the shared database (kept for ``placement_ttl_s``,
looked up again when an owner fails). A shard whose owner cannot answer is retried, on
whoever owns it by then, until ``takeover_s`` has passed (a dead worker's lease runs
out and another loads the shard); then the search fails with ``ShardUnavailable``
(503): never an answer that silently leaves a shard out.

Each search carries the fleet's ``retrieval.worker_token`` as a bearer token; a worker
that refuses it (401) fails the search at once (503, saying so): a token that differs
is a configuration to fix, not a worker to wait for.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from retrieval.docstore import CollectionInfo, DocStore
from retrieval.errors import ShardUnavailable
from retrieval.wire import encode

RETRY_S = 0.1  # between tries of a shard with no owner that answers


@dataclass(frozen=True)
class Scatter:
    """How a gateway reaches the index workers (``retrieval.index_workers``)."""

    timeout_s: float = 2.0  # one shard's search
    takeover_s: float = 15.0  # how long a shard may have no owner that answers
    token: str | None = field(default=None, repr=False)  # retrieval.worker_token


class ShardRouter:
    def __init__(
        self,
        docstore: DocStore,
        *,
        timeout_s: float = 2.0,
        takeover_s: float = 15.0,
        placement_ttl_s: float = 1.0,
        token: str | None = None,
    ) -> None:
        self.docstore = docstore
        self._headers = {} if token is None else {"authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s
        self.takeover_s = takeover_s
        self.placement_ttl_s = placement_ttl_s
        self._placement: dict[tuple[str, str], tuple[float, dict[int, str]]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ShardRouter(timeout_s={self.timeout_s}, takeover_s={self.takeover_s})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def search(
        self, info: CollectionInfo, vector: np.ndarray, k: int, min_seq: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """The collection's top ``k`` (scores and ids, shape 1 x k, id -1 past the end)
        over all its shards."""
        parts = await asyncio.gather(
            *(self._shard(info, shard, vector, k, min_seq) for shard in range(info.shards))
        )
        scores = np.concatenate([s[0] for s, _ in parts])
        ids = np.concatenate([i[0] for _, i in parts])
        order = np.lexsort((ids, -scores))[:k]  # best first; ties by id, as one index
        out_scores = np.full((1, k), -np.inf, dtype=np.float32)
        out_ids = np.full((1, k), -1, dtype=np.int64)
        kept = [n for n in order if ids[n] >= 0]
        out_scores[0, : len(kept)] = scores[kept]
        out_ids[0, : len(kept)] = ids[kept]
        return out_scores, out_ids

    async def _shard(
        self, info: CollectionInfo, shard: int, vector: np.ndarray, k: int, min_seq: int
    ) -> tuple[np.ndarray, np.ndarray]:
        deadline = time.monotonic() + self.takeover_s
        fresh = False
        last = "no index worker owns it"
        while True:
            url = (await self._owners(info, fresh)).get(shard)
            if url is not None:
                try:
                    return await self._ask(url, info, shard, vector, k, min_seq)
                except (aiohttp.ClientError, TimeoutError, _Refused) as exc:
                    last = f"{url}: {type(exc).__name__} {exc}".strip()
            if time.monotonic() >= deadline:
                raise ShardUnavailable(
                    f"shard {shard} of {info.name}: {last} (waited {self.takeover_s:.0f} s)"
                )
            fresh = True
            await asyncio.sleep(RETRY_S)

    async def _owners(self, info: CollectionInfo, fresh: bool) -> dict[int, str]:
        key = (info.tenant, info.name)
        cached = self._placement.get(key)
        if cached is not None and not fresh and time.monotonic() - cached[0] < self.placement_ttl_s:
            return cached[1]
        owners = await asyncio.to_thread(self._read_owners, info)
        self._placement[key] = (time.monotonic(), owners)
        return owners

    def _read_owners(self, info: CollectionInfo) -> dict[int, str]:
        with self.docstore.db.read() as cur:
            rows = cur.execute(
                "SELECT shard, url FROM shard_owners WHERE tenant=? AND collection=?",
                (info.tenant, info.name),
            ).fetchall()
        return {int(s): str(u) for s, u in rows}

    async def _ask(
        self, url: str, info: CollectionInfo, shard: int, vector: np.ndarray, k: int, min_seq: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        body = {"tenant": info.tenant, "collection": info.name, "shard": shard,
                "vector": encode(vector), "k": k, "min_seq": min_seq}  # fmt: skip
        async with self._session.post(f"{url}/search", json=body, headers=self._headers) as answer:
            data: dict[str, Any] = await answer.json(content_type=None)
            if answer.status == 401:
                raise ShardUnavailable(
                    f"shard {shard} of {info.name}: the index worker at {url} refused this"
                    " gateway's retrieval.worker_token (401); gateways and index workers"
                    " must share one token"
                )
            if answer.status != 200:
                raise _Refused(f"{answer.status} {data.get('error', '')}")
        return (np.asarray([data["scores"]], dtype=np.float32),
                np.asarray([data["ids"]], dtype=np.int64))  # fmt: skip


class _Refused(Exception):
    """The worker answered, but not with results (it no longer holds the shard)."""
