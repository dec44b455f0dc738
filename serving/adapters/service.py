"""Which engines hold which LoRA adapters, and keeping it so.

A base version with LoRA on (``lora`` or ``adapters`` in its configuration) serves the
adapters its configuration lists and those the adapter store holds for it. Each healthy
replica of it is filled with them (up to its ``max_loras``): at start, and whenever the
replica comes back or joins (a restarted engine holds nothing), by a watcher that runs
every ``interval_s``. An adapter serves (``MODEL:ADAPTER`` resolves) once one replica
holds it. ``add`` loads a newly stored adapter into every replica of its base at once,
without a restart; ``remove`` stops new requests for it, lets those running finish, and
unloads it.

Routing prefers replicas that hold the adapter (``holds``); a request for one that no
replica holds loads it first (``ensure``), unloading the least recently used adapter of
that replica when it holds ``max_loras`` already (``weir_adapter_evictions_total``). A
load that fails is ``AdapterLoadFailed`` (503, with the engine's reason); the replica's
other adapters and the base keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from models.adapters.errors import AdapterLoadFailed, AdapterNotInStore
from models.adapters.store import AdapterStore, StoredAdapter
from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.errors import StoreError
from models.registry import Registry
from models.types import ADAPTER, VersionKey
from serving.adapters.control import AdapterControl
from serving.adapters.metrics import AdapterMetrics
from serving.errors import DeployRefused
from serving.rollout.tracker import VersionTracker

log = logging.getLogger("weir.adapters")


@dataclass(eq=False)
class Held:
    """What one engine holds, least recently used first, as of ``generation`` (the
    replica's ``since`` when it was filled: a restart or a health change makes it stale)."""

    names: OrderedDict[str, None] = field(default_factory=OrderedDict)
    generation: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def lora_versions(models: list[ModelConfig]) -> dict[VersionKey, VersionConfig]:
    """The local versions that start their engines with LoRA on."""
    return {
        VersionKey(m.name, v.version): v
        for m in models
        for v in m.versions
        if v.lora_enabled and v.weights is not None
    }


class AdapterService:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        store: AdapterStore,
        control: AdapterControl,
        *,
        tracker: VersionTracker | None = None,
        metrics: AdapterMetrics | None = None,
        interval_s: float = 1.0,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.store = store
        self.control = control
        self.tracker = tracker
        self.metrics = metrics
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self.wanted: dict[VersionKey, dict[str, StoredAdapter]] = {}
        self._held: weakref.WeakKeyDictionary[Replica, Held] = weakref.WeakKeyDictionary()
        self._watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AdapterService(wanted={ {str(k): list(v) for k, v in self.wanted.items()} })"

    # ---- what each base version serves

    def bases(self) -> dict[VersionKey, VersionConfig]:
        return lora_versions(self.registry.models)

    def wanted_of(self, base: VersionKey, version: VersionConfig) -> dict[str, StoredAdapter]:
        """The adapters ``base`` serves: read from the store the first time it is asked
        (``AdapterNotInStore`` for a configured one the store lacks, ``StoreError`` for one
        stored for another base)."""
        found = self.wanted.get(base)
        if found is not None:
            return found
        adapters = {a.name: a for a in self.store.of_base(*base)}
        on_base = [  # the adapters of running alias versions on this base (others: on deploy)
            v.adapter
            for m in self.registry.models
            for v in m.versions
            if v.base == str(base) and v.adapter is not None and v.version in m.running()
        ]
        for name in [*version.adapters, *on_base]:
            adapter = self.store.get(name)
            if (adapter.base_model, adapter.base_version) != tuple(base):
                raise StoreError(
                    f"{base} lists adapter '{name}', which was checked against"
                    f" {adapter.base_model}@{adapter.base_version}, not {base}"
                )
            adapters[name] = adapter
        self.wanted[base] = adapters
        return adapters

    def check(self) -> None:
        """Every LoRA version's adapters are in the store (before engines start)."""
        for base, version in self.bases().items():
            self.wanted_of(base, version)

    # ---- which replica holds what

    def _state(self, replica: Replica) -> Held:
        held = self._held.get(replica)
        if held is None:
            held = self._held[replica] = Held()
        if held.generation != replica.since:  # restarted, joined or back: held nothing sure
            held.names.clear()
            held.generation = replica.since
        return held

    def holds(self, replica: Replica, adapter: str) -> bool:
        held = self._held.get(replica)
        return held is not None and held.generation == replica.since and adapter in held.names

    def path_of(self, base: VersionKey, adapter: str) -> str | None:
        """The path ``base``'s engines load ``adapter`` from (vLLM hashes its KV blocks
        with it); None when ``base`` does not serve it."""
        stored = self.wanted.get(base, {}).get(adapter)
        return None if stored is None else str(stored.path)

    def held(self, replica: Replica) -> list[str]:
        held = self._held.get(replica)
        if held is None or held.generation != replica.since:
            return []
        return list(held.names)

    async def ensure(self, replica: Replica, adapter: str) -> None:
        """``replica`` holds ``adapter`` when this returns (the most recently used now)."""
        held = self._held.get(replica)
        if held is not None and self.holds(replica, adapter):
            held.names.move_to_end(adapter)
            return
        base = replica.key.version_key
        version = self.bases().get(base)
        stored = self.wanted.get(base, {}).get(adapter)
        if version is None or stored is None:
            raise AdapterLoadFailed(f"{base} does not serve adapter '{adapter}'", engine=str(base))
        held = self._state(replica)
        async with held.lock:
            held = self._state(replica)
            if adapter in held.names:
                held.names.move_to_end(adapter)
                return
            while len(held.names) >= version.max_loras:
                victim = next(iter(held.names))
                await self.control.unload(replica, victim)
                held.names.pop(victim, None)
                log.info("%s: unloaded adapter %s (least recently used)", replica.key, victim)
                if self.metrics is not None:
                    self.metrics.evictions.labels(base.model, base.version).inc()
            try:
                await self.control.load(replica, adapter, stored.path)
            except AdapterLoadFailed:
                self._count(base, adapter, "failed")
                raise
            self._count(base, adapter, "ok")
            held.names[adapter] = None
            if self.metrics is not None:
                self.metrics.held.labels(str(replica.key)).set(len(held.names))

    def _count(self, base: VersionKey, adapter: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.loads.labels(base.model, base.version, adapter, result).inc()

    # ---- filling replicas: at start, on restart and join

    async def start(self) -> None:
        """Fill the replicas healthy now, then watch for the others."""
        await self.sync()
        self._watcher = asyncio.create_task(self._watch(), name="adapters")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the watcher must outlive one bad round; said loudly
                log.exception("adapter sync round failed")
            await asyncio.sleep(self.interval_s)

    async def sync(self) -> None:
        """Fill every healthy replica of a LoRA version that is new, restarted or back."""
        bases = self.bases()
        jobs = []
        for replica in list(self.fleet.replicas):
            base = replica.key.version_key
            version = bases.get(base)
            if version is None or not replica.healthy:
                continue
            held = self._held.get(replica)
            if held is not None and held.generation == replica.since:
                continue
            jobs.append(self._fill(replica, base, sorted(self.wanted_of(base, version))))
        await asyncio.gather(*jobs)

    async def _fill(self, replica: Replica, base: VersionKey, names: list[str]) -> None:
        """Load the first ``max_loras`` of ``names``; all of them serve from now on (the
        rest load on demand; one that fails to load answers 503 with the reason)."""
        self._state(replica)
        limit = self.bases()[base].max_loras
        for name in names[:limit]:
            try:
                await self.ensure(replica, name)
            except AdapterLoadFailed as exc:
                log.error("%s", exc)
        for name in names:
            self.registry.serve_adapter(base, name)

    # ---- adding and removing at runtime

    async def add(self, name: str) -> dict[str, Any]:
        """Serve a stored adapter: load it into every healthy replica of its base now.

        ``DeployRefused`` when its base is not a running LoRA version;
        ``AdapterLoadFailed`` (with every engine's reason) when no replica loads it."""
        try:
            stored = await asyncio.to_thread(self.store.verify, name)
        except AdapterNotInStore:
            raise
        except StoreError as exc:
            raise DeployRefused(str(exc)) from None
        base = VersionKey(stored.base_model, stored.base_version)
        version = self.bases().get(base)
        if version is None:
            raise DeployRefused(
                f"adapter '{name}' is for {base}, which is not a configured version with LoRA"
                " on (set lora = true on it, then restart its engines)"
            )
        if base.version not in self.registry.running(base.model):
            raise DeployRefused(f"adapter '{name}' is for {base}, which is not running")
        self.wanted_of(base, version)[name] = stored
        replicas = [r for r in self.fleet.replicas if r.key.version_key == base and r.healthy]
        results = await asyncio.gather(
            *(self.ensure(r, name) for r in replicas), return_exceptions=True
        )
        errors = [str(e) for e in results if isinstance(e, BaseException)]
        for error in results:
            if isinstance(error, BaseException) and not isinstance(error, AdapterLoadFailed):
                raise error
        if replicas and len(errors) == len(replicas):
            self.wanted[base].pop(name, None)
            raise AdapterLoadFailed("; ".join(errors), engine=str(base))
        self.registry.serve_adapter(base, name)
        log.info("adapter %s serves as %s%s%s", name, base.model, ADAPTER, name)
        return self.view(name, base, errors)

    async def attach(self, base: VersionKey, name: str) -> dict[str, Any]:
        """``add``, for an alias's version that names ``name`` on ``base`` (a deploy)."""
        stored = await asyncio.to_thread(self.store.get, name)
        if (stored.base_model, stored.base_version) != tuple(base):
            raise DeployRefused(
                f"adapter '{name}' was checked against {stored.base_model}@"
                f"{stored.base_version}, not {base}"
            )
        return await self.add(name)

    async def remove(self, name: str) -> dict[str, Any]:
        """No new requests for it; those running finish (``drain_timeout_s``); unloaded."""
        base = next((b for b, names in self.wanted.items() if name in names), None)
        if base is None:
            raise AdapterNotInStore(name, str(self.store.root))
        users = [
            f"{m.name}@{v.version}"
            for m in self.registry.models
            for v in m.versions
            if v.adapter == name
            and v.base == str(base)
            and v.version in self.registry.running(m.name)
        ]
        if users:
            raise DeployRefused(
                f"adapter '{name}' serves {', '.join(users)}: deploy another version first"
            )
        self.registry.drop_adapter(base, name)
        key = VersionKey(base.model, f"{base.version}{ADAPTER}{name}")
        if self.tracker is not None and not await self.tracker.drained(key, self.drain_timeout_s):
            log.error("%s: requests still running after %gs; unloading", key, self.drain_timeout_s)
        self.wanted[base].pop(name, None)
        errors: list[str] = []
        for replica in [r for r in self.fleet.replicas if r.key.version_key == base]:
            held = self._held.get(replica)
            if held is None or name not in held.names:
                continue
            async with held.lock:
                try:
                    await self.control.unload(replica, name)
                except AdapterLoadFailed as exc:
                    errors.append(str(exc))
                held.names.pop(name, None)
        return self.view(name, base, errors)

    def view(self, name: str, base: VersionKey, errors: list[str] | None = None) -> dict[str, Any]:
        replicas = [r for r in self.fleet.replicas if r.key.version_key == base]
        return {
            "adapter": name,
            "model": f"{base.model}{ADAPTER}{name}",
            "base": str(base),
            "replicas": [{"replica": str(r.key), "holds": self.holds(r, name)} for r in replicas],
            "errors": errors or [],
        }
