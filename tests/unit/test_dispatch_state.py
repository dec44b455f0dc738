"""The dispatcher's routing state: one ``ServedModel`` per model, one ``ReplicaLoad`` per
replica (kept by replica, gone with it), and ``VersionKey`` for every per-version table."""

from __future__ import annotations

import gc

from models.config import ModelConfig, RoutingConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey, ServedVersion, VersionKey
from serving.routing.dispatch import Deadlines, Dispatcher
from tests.fakes.engine import FakeEngine

ROUTING = RoutingConfig(breaker_failures=2, breaker_open_s=7, breaker_probes=3, max_in_flight=4)


def model(*versions: str) -> ModelConfig:
    return ModelConfig(
        name="m",
        task="chat",
        current=versions[0],
        versions=[VersionConfig(version=v, url="http://x") for v in versions],
        routing=ROUTING,
    )


def replica(version: str, index: int) -> Replica:
    return Replica(ReplicaKey("m", version, index), FakeEngine(), "m", healthy=True)


class Clock:
    now = 5.0

    def __call__(self) -> float:
        return self.now


def test_version_key_prints_as_model_at_version_and_keys_tables() -> None:
    key = VersionKey("m", "v1")
    assert str(key) == "m@v1"
    assert ServedVersion("m", "v1", "chat").key == key
    assert ReplicaKey("m", "v1", 3).version_key == key
    assert {key: 1}[VersionKey("m", "v1")] == 1


def test_one_served_model_per_model_with_a_bulkhead_per_version() -> None:
    dispatcher = Dispatcher(Fleet([]), [model("v1")], Deadlines(1.0, 2.0))
    served = dispatcher.models["m"]
    assert served.deadlines == Deadlines(1.0, 2.0)
    assert list(served.bulkheads) == [VersionKey("m", "v1")]
    assert served.bulkheads[VersionKey("m", "v1")].name == "m@v1"
    dispatcher.configure(model("v1", "v2"))  # a deploy adds a version
    assert dispatcher.models["m"] is served
    assert list(dispatcher.bulkheads()) == [VersionKey("m", "v1"), VersionKey("m", "v2")]
    assert dispatcher.bulkheads()[VersionKey("m", "v2")].max_in_flight == 4


def test_replica_loads_take_their_models_breaker_settings_and_go_with_the_replica() -> None:
    clock = Clock()
    first = replica("v1", 0)
    dispatcher = Dispatcher(Fleet([first]), [model("v1")], Deadlines(1.0, 2.0), clock=clock)
    breaker = dispatcher.load_of(first).breaker
    assert (breaker.failures_to_open, breaker.open_s, breaker.probes) == (2, 7, 3)
    assert breaker.clock is clock
    assert dispatcher.load_of(first) is dispatcher.load_of(first)
    joined = replica("v1", 1)  # e.g. found in DNS: never adopted, still configured
    assert dispatcher.load_of(joined).breaker.open_s == 7
    assert dispatcher.load_of(joined) is not dispatcher.load_of(first)
    assert len(dispatcher._loads) == 2
    del joined
    gc.collect()
    assert len(dispatcher._loads) == 1  # a replica that left the fleet takes its load along


def test_available_reads_the_breaker_from_the_replicas_load() -> None:
    only = replica("v1", 0)
    dispatcher = Dispatcher(Fleet([only]), [model("v1")], Deadlines(1.0, 2.0))
    served = ServedVersion("m", "v1", "chat")
    assert dispatcher.available(served)
    breaker = dispatcher.load_of(only).breaker
    breaker.record(True)
    breaker.record(True)  # two faults open it (breaker_failures = 2)
    assert breaker.state == "open"
    assert not dispatcher.available(served)
