"""The fleet: every replica of every served version, its health, and which one to use.

A replica is an ``Engine`` (how to talk to it) plus, for local engines, the
``EngineProcess`` that keeps it running. One monitor task polls every replica's
``/health``; a local replica that never becomes healthy within the start timeout is
restarted. A healthy replica leaves the rotation after ``unhealthy_after`` failed checks
in a row (a busy CPU engine can be slow to answer one), or at once when its process has
died. Which replica gets a request is ``serving.routing.router``'s choice; the routing
state of a replica (its breaker, its requests in flight) is kept there, by replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from models.engines.client import Engine
from models.engines.placement import Host, Placement
from models.engines.supervisor import EngineProcess
from models.types import ReplicaKey, ServedVersion, VersionKey

log = logging.getLogger("weir.fleet")


@dataclass(eq=False)
class Replica:
    key: ReplicaKey
    engine: Engine
    served_name: str  # the model name the engine itself answers to
    process: EngineProcess | None = None
    healthy: bool = False
    since: float = field(default_factory=time.monotonic)  # last state change or spawn
    failed_checks: int = 0  # health checks failed in a row
    placement: Placement | None = None  # its GPUs or cores (local engines)
    published_restarts: int = 0  # a board replica's: what the supervisor running it says

    @property
    def restarts(self) -> int:
        """How often its engine was restarted, by us or by the supervisor on the board."""
        return self.process.restarts if self.process is not None else self.published_restarts


class Fleet:
    def __init__(
        self,
        replicas: Iterable[Replica],
        *,
        health_interval_s: float = 2.0,
        start_timeout_s: float = 600.0,
        unhealthy_after: int = 1,
        clock: Callable[[], float] = time.monotonic,
        host: Host | None = None,
    ) -> None:
        self.replicas = list(replicas)
        self.host = host  # the devices read at start, before any engine: what placement plans on
        self.health_interval_s = health_interval_s
        self.start_timeout_s = start_timeout_s
        self.unhealthy_after = unhealthy_after
        self.clock = clock
        self._by_version: dict[VersionKey, list[Replica]] = {}
        self.expected: set[VersionKey] = set()  # not ready until replicas join (a board)
        self._index()
        self._monitor: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Fleet(replicas={[str(r.key) for r in self.replicas]!r})"

    def _index(self) -> None:
        by_version: dict[VersionKey, list[Replica]] = {}
        for replica in self.replicas:
            by_version.setdefault(replica.key.version_key, []).append(replica)
        self._by_version = by_version
        self.expected -= set(by_version)  # joined: readiness is theirs now

    async def add(self, replicas: list[Replica]) -> None:
        """Start new replicas (a deploy); they take requests once their health check passes."""
        now = self.clock()
        for replica in replicas:
            replica.since = now
        self.replicas = [*self.replicas, *replicas]
        self._index()
        await asyncio.gather(*(r.process.start() for r in replicas if r.process))

    async def remove(self, version_key: VersionKey) -> list[Replica]:
        """Take a version's replicas out of the fleet, stop their engines, close clients."""
        return await self.discard(list(self._by_version.get(version_key, [])))

    async def discard(self, gone: list[Replica]) -> list[Replica]:
        """Take these replicas out (requests already on them finish), stop local engines."""
        self.replicas = [r for r in self.replicas if r not in gone]
        self._index()
        await asyncio.gather(*(r.process.stop() for r in gone if r.process))
        for replica in gone:
            replica.healthy = False
            await replica.engine.aclose()
        return gone

    async def wait_healthy(self, replicas: list[Replica], timeout_s: float) -> str | None:
        """Wait until every one of ``replicas`` is healthy; ``None``, or why not.

        A local engine that exits before its first healthy check fails at once (a crash at
        start repeats itself: bad weights, bad arguments, no memory)."""
        deadline = self.clock() + timeout_s
        while True:
            for replica in replicas:
                process = replica.process
                if process is not None and (process.restarts > 0 or process.exited):
                    return f"engine {replica.key} exited during start-up (log: {process.log_path})"
            if all(r.healthy for r in replicas):
                return None
            remaining = deadline - self.clock()
            if remaining <= 0:
                sick = [str(r.key) for r in replicas if not r.healthy]
                return f"engines {sick} not healthy after {timeout_s:g}s"
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def start(self) -> None:
        await asyncio.gather(*(r.process.start() for r in self.replicas if r.process))
        now = self.clock()
        for replica in self.replicas:
            replica.since = now
        await self.check_once()
        self._monitor = asyncio.create_task(self._watch(), name="fleet health")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await asyncio.gather(*(r.process.stop() for r in self.replicas if r.process))
        for replica in self.replicas:
            replica.healthy = False
            await replica.engine.aclose()

    def placements(self) -> list[Placement]:
        """Where the local replicas run now (a deploy plans beside these)."""
        return [r.placement for r in self.replicas if r.placement is not None]

    def replicas_of(self, version: ServedVersion) -> list[Replica]:
        return self._by_version.get(version.engine, [])  # an adapter runs on its base

    def readiness(self) -> dict[str, bool]:
        """Per served version (``model@version``): does it have a healthy replica?"""
        ready = {str(key): any(r.healthy for r in reps) for key, reps in self._by_version.items()}
        return {str(key): False for key in self.expected} | ready

    def ready(self) -> bool:
        return all(self.readiness().values())

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = self.clock() + timeout_s
        while not self.ready():
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return True

    async def check_once(self) -> None:
        replicas = list(self.replicas)  # a deploy may add or remove replicas meanwhile
        results = await asyncio.gather(*(r.engine.health() for r in replicas))
        now = self.clock()
        for replica, ok in zip(replicas, results, strict=True):
            if replica not in self.replicas:
                continue
            replica.failed_checks = 0 if ok else replica.failed_checks + 1
            dead = replica.process is not None and not replica.process.running
            if dead:
                ok = False
            elif not ok and replica.healthy and replica.failed_checks < self.unhealthy_after:
                continue  # a busy engine may miss one check; a dead process never waits
            if ok != replica.healthy:
                replica.healthy = ok
                replica.since = now
                log.info("replica %s is %s", replica.key, "healthy" if ok else "unhealthy")
                self._changed.set()
            elif not ok and replica.process is not None:
                await self._restart_if_stuck(replica, now)

    async def _restart_if_stuck(self, replica: Replica, now: float) -> None:
        process = replica.process
        if process is None or not process.running:
            return
        if now - max(replica.since, process.started_at) > self.start_timeout_s:
            log.error(
                "replica %s not healthy after %.0fs; restarting", replica.key, self.start_timeout_s
            )
            replica.since = now
            await process.restart()

    async def _watch(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # the monitor must outlive any one bad check; log it loudly
                log.exception("health check round failed")
            await asyncio.sleep(self.health_interval_s)
