"""An index worker: holds some shards of the collections in the shared docstore and
answers searches of them (``weir retrieval serve``; the HTTP side is
``retrieval.worker_http``).

Placement lives in the database. Every ``lease_s / 3`` a worker renews its row in
``index_workers`` and, by rendezvous hashing of each shard over the live workers (those
whose lease has not run out), finds the shards that are its own. It loads such a shard
(its snapshot under ``root``, if it has one, plus the log after it; else the log from
the start: the vectors are in the docstore) and only then claims it in
``shard_owners`` (its URL, a lease), taking it from an owner whose lease ran out: that
is the takeover when a worker dies. A shard whose row names another worker is dropped;
one that hashing gives to a new worker is served until that worker has claimed it.
Held shards follow the log like a gateway's replicas (NOTIFY, or the interval), and a
search with ``min_seq`` first catches up to it (strong consistency).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.docstore import CollectionInfo, DocStore
from retrieval.index import IndexParams, VectorIndex

log = logging.getLogger("weir.retrieval.worker")


@dataclass(frozen=True, order=True)
class ShardKey:
    tenant: str
    collection: str
    shard: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.collection}/{self.shard}"


class NotHeld(Exception):
    """This worker does not hold the shard (the gateway's placement is out of date)."""


def rendezvous(key: ShardKey, workers: list[str]) -> str:
    """The worker a shard belongs to: the highest hash of (worker, shard), so a worker
    leaving moves only its own shards, spread over the others."""
    return max(workers, key=lambda w: hashlib.sha256(f"{w}|{key}".encode()).digest())


@dataclass
class Held:
    index: VectorIndex
    created: float


class IndexWorker:
    def __init__(
        self,
        docstore: DocStore,
        root: Path,
        worker_id: str,
        url: str,
        *,
        params: IndexParams | None = None,
        lease_s: float = 5.0,
        snapshot_every: int = 1000,
    ) -> None:
        self.docstore = docstore
        self.root = root
        self.worker_id = worker_id
        self.url = url
        self.params = params or IndexParams()
        self.lease_s = lease_s
        self.snapshot_every = snapshot_every
        self.held: dict[ShardKey, Held] = {}
        self._since_snapshot: dict[ShardKey, int] = {}
        self._locks: dict[ShardKey, threading.Lock] = {}
        self._round = threading.Lock()

    def __repr__(self) -> str:
        return f"IndexWorker(id={self.worker_id!r}, url={self.url!r})"

    # placement
    def heartbeat(self) -> None:
        """One round: renew this worker's lease, load and claim the shards that are its
        own, renew their leases, drop the ones another worker owns now."""
        with self._round:
            now = time.time()
            until = now + self.lease_s
            with self.docstore.db.tx() as cur:
                cur.execute(
                    "INSERT INTO index_workers (worker, url, lease_until) VALUES (?, ?, ?)"
                    " ON CONFLICT (worker) DO UPDATE SET url=excluded.url,"
                    " lease_until=excluded.lease_until",
                    (self.worker_id, self.url, until),
                )
                live = sorted(str(r[0]) for r in cur.execute(
                    "SELECT worker FROM index_workers WHERE lease_until > ?", (now,)
                ).fetchall())  # fmt: skip
                rows = cur.execute(
                    "SELECT tenant, collection, shard, owner, lease_until FROM shard_owners"
                ).fetchall()
            owners = {ShardKey(str(t), str(c), int(s)): (str(o), float(u))
                      for t, c, s, o, u in rows}  # fmt: skip
            infos = self.docstore.infos()
            wanted: dict[ShardKey, CollectionInfo] = {}
            for info in infos:
                for shard in range(info.shards):
                    key = ShardKey(info.tenant, info.name, shard)
                    if self.worker_id in live and rendezvous(key, live) == self.worker_id:
                        wanted[key] = info
            for key, info in wanted.items():
                owner, lease_until = owners.get(key, ("", 0.0))
                if owner not in ("", self.worker_id) and lease_until > now:
                    continue  # still another's: it lets go when its lease runs out
                self._load(key, info)
                if not self._claim(key, now, until):
                    self._drop(key)
            exists = {(i.tenant, i.name): i.created for i in infos}
            for key in list(self.held):
                owner, _ = owners.get(key, (self.worker_id, 0.0))
                gone = exists.get((key.tenant, key.collection)) != self.held[key].created
                if gone or (owner != self.worker_id and key not in wanted):
                    self._drop(key)

    def _claim(self, key: ShardKey, now: float, until: float) -> bool:
        with self.docstore.db.tx() as cur:
            cur.execute(
                "INSERT INTO shard_owners (tenant, collection, shard, owner, url, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, collection, shard) DO UPDATE"
                " SET owner=excluded.owner, url=excluded.url, lease_until=excluded.lease_until"
                " WHERE shard_owners.owner = excluded.owner OR shard_owners.lease_until < ?",
                (key.tenant, key.collection, key.shard, self.worker_id, self.url, until, now),
            )
            row = cur.execute(
                "SELECT owner FROM shard_owners WHERE tenant=? AND collection=? AND shard=?",
                (key.tenant, key.collection, key.shard),
            ).fetchone()
        return row is not None and str(row[0]) == self.worker_id

    def leave(self) -> None:
        """A clean stop: the shards and the worker's row are given up at once, so others
        take over without waiting for the leases to run out."""
        with self.docstore.db.tx() as cur:
            cur.execute("DELETE FROM index_workers WHERE worker=?", (self.worker_id,))
            cur.execute("DELETE FROM shard_owners WHERE owner=?", (self.worker_id,))
        for key, held in list(self.held.items()):
            held.index.save(self._dir(key))

    # shards
    def _dir(self, key: ShardKey) -> Path:
        digest = hashlib.sha256(key.tenant.encode()).hexdigest()[:16]
        return self.root / "shards" / digest / key.collection / str(key.shard)

    def _lock(self, key: ShardKey) -> threading.Lock:
        return self._locks.setdefault(key, threading.Lock())

    def _load(self, key: ShardKey, info: CollectionInfo) -> None:
        with self._lock(key):
            held = self.held.get(key)
            if held is None or held.created != info.created:
                index = VectorIndex.load(self._dir(key), self.params, info.created)
                if index is None:
                    index = VectorIndex(info.dim, self.params, created=info.created)
                self.held[key] = Held(index, info.created)
        self.catch_up(key)

    def _drop(self, key: ShardKey) -> None:
        with self._lock(key):
            held = self.held.pop(key, None)
            if held is not None:
                held.index.save(self._dir(key))  # a later takeover starts from here

    def catch_up(self, key: ShardKey) -> None:
        with self._lock(key):
            held = self.held.get(key)
            if held is None:
                return
            change = self.docstore.changes_since(
                key.tenant, key.collection, held.index.seq, key.shard
            )
            if change.seq <= held.index.seq:
                return
            held.index.remove(change.removed)
            if change.added:
                held.index.add([i for i, _ in change.added],
                               np.stack([v for _, v in change.added]))  # fmt: skip
            held.index.seq = change.seq
            self._since_snapshot[key] = self._since_snapshot.get(key, 0) + 1
            if self._since_snapshot[key] >= self.snapshot_every:
                held.index.save(self._dir(key))
                self._since_snapshot[key] = 0

    def sync(self) -> None:
        """Every held shard caught up to its collection's head (the follower's round)."""
        for key in list(self.held):
            self.catch_up(key)

    def index(self, key: ShardKey, min_seq: int = 0) -> VectorIndex:
        """The shard's index, caught up to ``min_seq`` at least; NotHeld if this worker
        does not hold it."""
        held = self.held.get(key)
        if held is None:
            raise NotHeld(str(key))
        if held.index.seq < min_seq:
            self.catch_up(key)
        return held.index
