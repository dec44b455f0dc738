"""The host's engines in one supervisor process, apart from the gateway workers.

``EngineHost`` starts and watches every local engine (the launcher's replicas: guarded
processes, restarted with back-off, health-checked by the fleet's monitor) and publishes
them on the board (``models.engines.board``) whenever a replica joins, leaves or changes
health. Workers follow the board; none of them starts an engine.

Which versions run can change at runtime (a deploy through any worker): ``want`` is
given the running versions of each model (from the shared rollout state) and starts
what is missing, placed beside what runs; a version no longer wanted leaves the board at
once (workers stop sending it new requests) and its engines are stopped ``retire_after_s``
later, so requests already on them finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from models.config import ModelConfig, StoreConfig, VersionConfig
from models.engines import kv_events
from models.engines.board import BoardWriter, entries
from models.engines.fleet import Fleet, Replica
from models.engines.launcher import ReplicaFactory, build_fleet, version_weights
from models.types import VersionKey

log = logging.getLogger("weir.engines")


def is_local(version: VersionConfig) -> bool:
    """Started on this host (not a URL, not found in DNS, not on another's engines)."""
    return not version.remote and version.dns is None and version.base is None


def local_only(models: list[ModelConfig]) -> list[ModelConfig]:
    """The models with only their local versions (what the supervisor starts)."""
    return [
        m.model_copy(update={"versions": [v for v in m.versions if is_local(v)]}) for m in models
    ]


def without_local(models: list[ModelConfig]) -> list[ModelConfig]:
    """The models without their local versions (what a worker builds its fleet from)."""
    return [
        m.model_copy(update={"versions": [v for v in m.versions if not is_local(v)]})
        for m in models
    ]


class EngineHost:
    def __init__(
        self,
        models: list[ModelConfig],
        weights: dict[VersionKey, Path],
        factory: ReplicaFactory,
        board: BoardWriter,
        store: StoreConfig,
        *,
        retire_after_s: float = 30.0,
        poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = {m.name: m for m in local_only(models)}
        self.weights = dict(weights)
        self.factory = factory
        self.board = board
        self.store = store
        self.retire_after_s = retire_after_s
        self.poll_s = poll_s
        self.clock = clock
        self.fleet: Fleet = build_fleet(list(self.models.values()), weights, factory)
        self._retiring: dict[VersionKey, float] = {}  # version -> when its engines stop
        self._starting: set[VersionKey] = set()

    def __repr__(self) -> str:
        return f"EngineHost(board={self.board!r})"

    def running(self) -> dict[str, list[str]]:
        versions: dict[str, set[str]] = {}
        for replica in self.fleet.replicas:
            key = replica.key.version_key
            if key not in self._retiring:
                versions.setdefault(key.model, set()).add(key.version)
        return {model: sorted(v) for model, v in versions.items()}

    def published(self) -> list[Replica]:
        return [r for r in self.fleet.replicas if r.key.version_key not in self._retiring]

    def publish(self) -> bool:
        published = entries(self.published(), self.events_of)
        return self.board.publish(published, running=self.running())

    def events_of(self, replica: Replica) -> kv_events.EventEndpoints | None:
        """Where ``replica``'s engine publishes KV events: started with them when its model
        routes ``kv_aware`` (the launcher's ``kv_events.engine_args``)."""
        model = self.models.get(replica.key.model)
        if model is None or not kv_events.wanted(model) or replica.process is None:
            return None
        return kv_events.local_endpoints(replica.key)

    async def want(self, model: ModelConfig, running: list[str]) -> None:
        """Make ``model``'s local versions that run equal ``running`` (a rollout moved)."""
        mine = local_only([model])[0]
        self.models[model.name] = mine
        have = {r.key.version for r in self.fleet.replicas if r.key.model == model.name}
        for version in mine.versions:
            key = VersionKey(model.name, version.version)
            if version.version in running:
                self._retiring.pop(key, None)
                if version.version not in have and key not in self._starting:
                    self._starting.add(key)
                    try:
                        await self._start(mine, version)
                    finally:
                        self._starting.discard(key)
            elif version.version in have and key not in self._retiring:
                log.info("%s no longer runs: off the board, stopped in %gs",
                         key, self.retire_after_s)  # fmt: skip
                self._retiring[key] = self.clock() + self.retire_after_s
        self.publish()

    async def _start(self, model: ModelConfig, version: VersionConfig) -> None:
        key = VersionKey(model.name, version.version)
        weights = self.weights.get(key)
        if weights is None and version.weights is not None:
            weights = await asyncio.to_thread(version_weights, version, self.store)
            self.weights[key] = weights
        host = self.fleet.host or self.factory.devices
        placements = self.factory.plan(
            model, version, weights, host=host, running=self.fleet.placements()
        )
        replicas = self.factory(model, version, weights, placements)
        log.info("starting %s: %d replicas", key, len(replicas))
        await self.fleet.add(replicas)

    async def _retire_due(self) -> None:
        now = self.clock()
        for key, when in list(self._retiring.items()):
            if now >= when:
                del self._retiring[key]
                gone = await self.fleet.remove(key)
                log.info("stopped %s (%d replicas)", key, len(gone))

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        """Start the engines, publish them until ``stop`` is set, then stop them all."""
        await self.fleet.start()
        try:
            self.publish()
            announced = False
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
                await self._retire_due()
                self.publish()
                if not announced and self.fleet.ready():
                    announced = True
                    log.info("all engines ready: %s", self.fleet.readiness())
                    if ready is not None:
                        ready()
        finally:
            self.board.remove()
            await self.fleet.stop()
