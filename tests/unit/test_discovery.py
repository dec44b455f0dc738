"""Engines found in DNS (a headless Service): replicas follow the A records."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.testclient import TestClient

from models.config import ModelConfig, VersionConfig
from models.engines.discovery import DnsDiscovery, engine_url
from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import Settings
from tests.fakes.engine import FakeEngine

CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


class FakeDns:
    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.fail = False
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.fail:
            raise OSError("Temporary failure in name resolution")
        return list(self.addresses)


def model() -> ModelConfig:
    return ModelConfig(
        name="smollm2", task="chat", current="v1",
        versions=[VersionConfig(version="v1", dns="vllm-v1.weir.svc:8000", dns_refresh_s=0.05)],
    )  # fmt: skip


def make_replica(engines: dict[str, FakeEngine]) -> Any:
    def make(model: ModelConfig, version: VersionConfig, key: ReplicaKey, url: str) -> Replica:
        return Replica(key, engines.setdefault(url, FakeEngine(name=url)), model.name)

    return make


def test_replicas_follow_the_records_and_survive_a_lookup_failure() -> None:
    async def run() -> None:
        dns = FakeDns("10.0.0.2", "10.0.0.1")
        fleet = Fleet([], health_interval_s=0.05)
        discovery = DnsDiscovery(fleet, make_replica({}), dns)
        config = model()
        discovery.track(config, config.versions[0])
        await discovery.refresh_all()
        assert dns.asked == [("vllm-v1.weir.svc", 8000)]
        assert sorted(str(r.key) for r in fleet.replicas) == ["smollm2@v1#0", "smollm2@v1#1"]
        dns.addresses = ["10.0.0.2", "10.0.0.3"]  # a pod went, another came
        await discovery.refresh_all()
        assert sorted(str(r.key) for r in fleet.replicas) == ["smollm2@v1#1", "smollm2@v1#2"]
        dns.fail = True
        await discovery.refresh_all()
        assert len(fleet.replicas) == 2  # a DNS blip changes nothing
        await fleet.stop()

    asyncio.run(run())


def test_engine_urls_bracket_ipv6() -> None:
    assert engine_url("10.0.0.1", 8000) == "http://10.0.0.1:8000"
    assert engine_url("fd00::1", 8000) == "http://[fd00::1]:8000"


@pytest.mark.parametrize("dns", ["no-port", "host:http", ":8000"])
def test_dns_must_name_a_port(dns: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        VersionConfig(version="v1", dns=dns)


def test_gateway_routes_to_discovered_engines_as_they_come_and_go() -> None:
    dns = FakeDns("10.0.0.1", "10.0.0.2")
    engines: dict[str, FakeEngine] = {}
    embed = ModelConfig(
        name="minilm", task="embed", current="l6", versions=[VersionConfig(version="l6", url="x")]
    )
    settings = Settings(models=[model(), embed])

    def fleet(_: object) -> Fleet:
        key = ReplicaKey("minilm", "l6", 0)
        return Fleet([Replica(key, FakeEngine(), "minilm")], health_interval_s=0.05)

    app = create_app(
        settings, fleet_factory=fleet, counters={},
        discovery_factory=lambda f, _: DnsDiscovery(f, make_replica(engines), dns),
    )  # fmt: skip
    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while len(engines) < 2 or not all(e.calls for e in engines.values()):
            assert time.monotonic() < deadline, engines
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        dns.addresses = ["10.0.0.2"]
        gone = engines["http://10.0.0.1:8000"]
        running = client.app.state.proxy.dispatcher.fleet  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while any(r.engine is gone for r in running.replicas):  # polled: a refresh has run
            assert time.monotonic() < deadline, "the departed engine was never dropped"
            time.sleep(0.01)
        before = len(engines["http://10.0.0.1:8000"].calls)
        for _ in range(5):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert len(engines["http://10.0.0.1:8000"].calls) == before
