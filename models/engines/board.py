"""The fleet board: local engines started by one supervisor, used by many gateway workers.

``weir engines`` (or ``weir serve --workers N``) starts the host's engines in one process
and writes what runs to a board file: every replica with its URL (the loopback port its
engine listens on), served name and health, under a sequence number, written whole and
renamed into place so a reader never sees half of it. Each gateway worker follows the
board (``BoardFollower``): a replica that appears joins the worker's fleet as a remote
engine (the same path as configured URLs and DNS-discovered engines: the worker checks
its health itself and never starts or stops it), one that disappears leaves it
(requests already on it finish). A missing or unreadable board changes nothing: a
supervisor restarting must not empty the workers' fleets.

An engine that publishes KV cache events (``kv_aware`` routing) has its event endpoints
on the board too (``kv_events``, ``kv_replay``: the supervisor's private ipc sockets, to
which any number of workers of the same user subscribe); the follower keeps them per
replica (``events_of``) for the worker's KV index (``serving.routing.kv_routing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.engines.kv_events import EventEndpoints
from models.types import ReplicaKey, VersionKey

log = logging.getLogger("weir.board")
MakeReplica = Callable[[ModelConfig, VersionConfig, ReplicaKey, str], Replica]
Lookup = Callable[[VersionKey], tuple[ModelConfig, VersionConfig] | None]
EventsOf = Callable[[Replica], EventEndpoints | None]
POLL_S = 0.1  # how often a follower looks at the board's file (a stat: microseconds)


@dataclass(frozen=True)
class Entry:
    """One published replica."""

    model: str
    version: str
    index: int
    url: str
    served_name: str
    healthy: bool
    kv_events: str | None = None  # its KV event PUB socket (boards before it: absent)
    kv_replay: str | None = None  # and replay ROUTER socket
    restarts: int = 0  # times the supervisor restarted it (boards before it: absent)

    @property
    def version_key(self) -> VersionKey:
        return VersionKey(self.model, self.version)

    @property
    def events(self) -> EventEndpoints | None:
        return None if self.kv_events is None else EventEndpoints(self.kv_events, self.kv_replay)


def entries(replicas: Iterable[Replica], events_of: EventsOf | None = None) -> list[Entry]:
    """What the supervisor publishes of its replicas (each engine's own base URL, and
    where it publishes KV events, by ``events_of``)."""
    out = []
    for replica in replicas:
        url = getattr(replica.engine, "base_url", None)
        if url is None:
            continue
        key = replica.key
        events = None if events_of is None else events_of(replica)
        out.append(
            Entry(
                key.model, key.version, key.index, url, replica.served_name, replica.healthy,
                kv_events=None if events is None else events.publisher,
                kv_replay=None if events is None else events.replay,
                restarts=replica.restarts,
            )
        )  # fmt: skip
    return out


class BoardWriter:
    """The supervisor's side: ``publish`` writes the board when what runs has changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        self._last: list[Entry] | None = None

    def __repr__(self) -> str:
        return f"BoardWriter(path={str(self.path)!r}, seq={self.seq})"

    def publish(self, now: list[Entry], *, running: dict[str, list[str]] | None = None) -> bool:
        """Write the board if ``now`` differs from what was last written; whether it did."""
        if now == self._last:
            return False
        self.seq += 1
        data: dict[str, Any] = {
            "seq": self.seq,
            "pid": os.getpid(),
            "replicas": [e.__dict__ for e in now],
        }
        if running is not None:
            data["running"] = running
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(data))
        os.replace(partial, self.path)
        self._last = list(now)
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read(path: Path) -> tuple[int, list[Entry]] | None:
    """The board's sequence number and replicas; ``None`` when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        return int(data["seq"]), [Entry(**raw) for raw in data["replicas"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("fleet board %s unreadable (%s); keeping the replicas known", path, exc)
        return None


class BoardFollower:
    """A worker's side: keeps the fleet's supervised replicas equal to the board's."""

    def __init__(
        self,
        fleet: Fleet,
        path: Path,
        lookup: Lookup,
        make_replica: MakeReplica,
        *,
        poll_s: float = POLL_S,
        on_added: Callable[[list[Replica]], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.path = path
        self.lookup = lookup
        self.make_replica = make_replica
        self.poll_s = poll_s
        self.on_added = on_added  # the dispatcher adopts them (their routing state)
        self.seq = -1
        self._stamp: tuple[int, int] | None = None
        self._known: dict[tuple[VersionKey, str], Replica] = {}
        self._events: dict[Replica, EventEndpoints] = {}
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"BoardFollower(path={str(self.path)!r}, seq={self.seq})"

    def replicas_of(self, key: VersionKey) -> list[Replica]:
        return [r for (version, _), r in self._known.items() if version == key]

    def events_of(self, replica: Replica) -> EventEndpoints | None:
        """Where a replica from the board publishes its KV events (None: it does not)."""
        return self._events.get(replica)

    async def refresh(self) -> bool:
        """Read the board if its file changed and reconcile; whether the fleet changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        board = read(self.path)
        if board is None:
            return False
        seq, published = board
        self.seq = seq
        wanted: dict[tuple[VersionKey, str], Entry] = {}
        for entry in published:
            wanted[(entry.version_key, entry.url)] = entry
        left = [  # an engine that publishes its events elsewhere now: another replica
            k
            for k, replica in self._known.items()
            if k not in wanted or wanted[k].events != self._events.get(replica)
        ]
        gone = [self._known.pop(k) for k in left]
        for replica in gone:
            self._events.pop(replica, None)
        added: list[Replica] = []
        for k, entry in wanted.items():
            if k in self._known:  # the same engine (restarted on its port: counted)
                self._known[k].published_restarts = entry.restarts
                continue
            found = self.lookup(entry.version_key)
            if found is None:
                continue  # a version this worker's configuration does not know (yet)
            model, version = found
            key = ReplicaKey(entry.model, entry.version, entry.index)
            replica = self.make_replica(model, version, key, entry.url)
            replica.healthy = entry.healthy  # the supervisor checked it; ours follow
            replica.published_restarts = entry.restarts
            self._known[k] = replica
            if entry.events is not None:
                self._events[replica] = entry.events
            added.append(replica)
        if gone:
            await self.fleet.discard(gone)
        if added:
            if self.on_added is not None:
                self.on_added(added)
            await self.fleet.add(added)
        if gone or added:
            log.info("fleet board %d: +%d -%d replicas", seq, len(added), len(gone))
            self.changed.set()
        return bool(gone or added)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet board")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one bad round
                log.exception("fleet board round failed")
