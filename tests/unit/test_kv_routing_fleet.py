"""KV-aware routing where the replicas come from elsewhere: a ``weir engines`` supervisor's
board, a deploy after start, the adapter service.

The engines' event streams come from ``tests.fakes.kv_publisher`` on vLLM's wire format,
bound where the engine would publish (an engine cannot be made to store given blocks on
demand); everything else is the gateway's own: the supervisor's board writer, a
worker's board follower and fleet, the app, its deployer and its adapter service.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from models.config import EngineConfig, ModelConfig, RoutingConfig, StoreConfig, VersionConfig
from models.engines.board import BoardWriter, read
from models.engines.client import EngineTimeouts
from models.engines.engine_host import EngineHost
from models.engines.fleet import Fleet, Replica
from models.engines.kv_events import EventEndpoints
from models.engines.launcher import ReplicaFactory, free_port
from models.engines.placement import CpuHost
from models.registry import Registry
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, VersionKey
from serving import workers
from serving.http.app import create_app
from serving.routing.dispatch import Deadlines, Dispatcher
from serving.routing.kv_routing import KvRouting, prompt_tokens
from serving.settings import DeployConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.fakes.kv_publisher import KvPublisher, stored
from tests.unit.test_adapters_gateway import FakeControl, LoraEngine
from tests.unit.test_adapters_gateway import stored as stored_adapters
from tests.unit.test_contract import store_dir

pytestmark = pytest.mark.anyio
ADMIN = {"authorization": "Bearer admin-secret"}
KV_AWARE = RoutingConfig(strategy="kv_aware")


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        time.sleep(0.02)


async def until_async(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)


# --- engines a supervisor started, used by a worker through the board -----------------


def supervisor(tmp_path: Path, models: list[ModelConfig]) -> EngineHost:
    """``weir engines``' host, its engines made (with their flags) but not started."""
    weights = {}
    for model in models:
        directory = tmp_path / f"{model.name}-w"
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"\0" * 1024)
        weights[VersionKey(model.name, "v1")] = directory
    engines = EngineConfig(host="cpu", log_dir=tmp_path / "logs")
    factory = ReplicaFactory(engines, EngineTimeouts(), machine=CpuHost((0, 1, 2, 3)))
    return EngineHost(models, weights, factory, BoardWriter(tmp_path / "board.json"), StoreConfig())


async def test_workers_follow_the_events_of_the_engines_on_the_board(tmp_path: Path) -> None:
    models = [
        ModelConfig(name="chat", task="chat", current="v1", routing=KV_AWARE,
                    versions=[VersionConfig(version="v1", weights="w", replicas=2)]),
        ModelConfig(name="plain", task="chat", current="v1",
                    versions=[VersionConfig(version="v1", weights="w")]),
    ]  # fmt: skip
    host = supervisor(tmp_path, models)
    for replica in host.fleet.replicas:
        replica.healthy = True  # as its health checks would say
    host.publish()
    board = read(tmp_path / "board.json")
    assert board is not None
    published = {(e.model, e.index): e for e in board[1]}
    for replica in host.fleet.replicas:  # what the engine was told to publish on
        assert replica.process is not None
        command = replica.process.command
        told = {}
        if "--kv-events-config" in command:
            told = json.loads(command[command.index("--kv-events-config") + 1])
        entry = published[(replica.key.model, replica.key.index)]
        assert (entry.kv_events, entry.kv_replay) == (
            told.get("endpoint"),
            told.get("replay_endpoint"),
        )
    assert published[("chat", 0)].kv_events != published[("chat", 1)].kv_events
    assert published[("plain", 0)].kv_events is None

    # a worker: its fleet has no local engine; it follows the board
    fleet = Fleet([])
    kv = KvRouting(models, {})
    dispatcher = Dispatcher(fleet, models, Deadlines(5.0, 30.0), kv=kv)
    factory = ReplicaFactory(EngineConfig(), EngineTimeouts())
    follower = workers.follow_board(tmp_path / "board.json", fleet, Registry(models), dispatcher,
                                    factory)  # fmt: skip
    where = published[("chat", 1)]
    assert where.kv_events is not None
    publisher = KvPublisher(where.kv_events, where.kv_replay)
    try:
        await follower.refresh()
        assert len(fleet.replicas) == 3
        kv.start(fleet)
        theirs = next(r for r in fleet.replicas if r.key == ReplicaKey("chat", "v1", 1))
        assert follower.events_of(theirs) == EventEndpoints(where.kv_events, where.kv_replay)
        assert {r.key for r in kv.index.followed()} == {
            ReplicaKey("chat", "v1", 0),
            ReplicaKey("chat", "v1", 1),
        }  # the plain model's engine publishes nothing

        def seen() -> bool:  # published until the subscriber has joined (slow joiner)
            publisher.publish(stored([11, 12], [1] * 256, 128))
            blocks = kv.index.blocks(theirs)
            return blocks is not None and blocks.ready and blocks.matched([11, 12]) == 2

        await until_async(seen)
        assert kv.index.blocks(theirs).block_size == 128  # type: ignore[union-attr]

        # the supervisor restarted elsewhere: the old replicas go, with their blocks
        moved = [e.__dict__ | {"kv_events": "ipc:///nowhere", "kv_replay": None}
                 for e in board[1]]  # fmt: skip
        (tmp_path / "board.json").write_text(json.dumps({"seq": 9, "replicas": moved}))
        await follower.refresh()
        assert theirs not in fleet.replicas
        kv.index.sync(fleet.replicas)
        assert kv.index.blocks(theirs) is None
    finally:
        await kv.stop()
        await follower.stop()
        await fleet.discard(list(fleet.replicas))
        publisher.close()


def test_a_board_written_before_kv_events_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "board.json"
    old = {"model": "m", "version": "v", "index": 0, "url": "http://127.0.0.1:1",
           "served_name": "m", "healthy": True}  # fmt: skip
    path.write_text(json.dumps({"seq": 1, "replicas": [old]}))
    board = read(path)
    assert board is not None
    assert board[1][0].events is None


# --- a version deployed after start ----------------------------------------------------


def test_a_deployed_version_is_routed_by_its_cache(tmp_path: Path) -> None:
    port = free_port()
    tokenizer = str(store_dir("smollm2-135m-instruct"))
    model = ModelConfig(
        name="smollm2", task="chat", current="v1", routing=KV_AWARE,
        versions=[VersionConfig(version="v1", url="http://127.0.0.2:1", tokenizer=tokenizer,
                                kv_events_port=port)],
    )  # fmt: skip
    config = Settings(
        models=[model], keys=KeysConfig(admin_key="admin-secret"),
        deploy=DeployConfig(start_timeout_s=5.0, warm_requests=1), store={"path": tmp_path / "s"},
    )  # fmt: skip
    engines: dict[str, FakeEngine] = {}

    def replicas(model: ModelConfig, version: VersionConfig) -> list[Replica]:
        made = []
        for index, url in enumerate(version.urls or [version.url]):
            key = ReplicaKey(model.name, version.version, index)
            engine = engines.setdefault(str(key), FakeEngine(name=str(key)))
            engine.base_url = url  # type: ignore[attr-defined]
            made.append(Replica(key, engine, model.name))
        return made

    app = create_app(
        config,
        fleet_factory=lambda _: Fleet(replicas(model, model.versions[0]), health_interval_s=0.05),
        replicas_factory=lambda _: lambda m, v, _w: replicas(m, v),
    )
    publisher = KvPublisher(f"tcp://127.0.0.1:{port}", None)  # v2's engine, at its URL's host
    body: dict[str, Any] = {
        "model": "smollm2", "max_tokens": 2,
        "messages": [{"role": "system", "content": "You are a careful assistant. " * 30},
                     {"role": "user", "content": "Hi"}],
    }  # fmt: skip
    try:
        with TestClient(app) as client:
            asked = {"version": "v2", "urls": ["http://127.0.0.1:8"],
                     "engine_args": ["--block-size", "32"]}  # fmt: skip
            answer = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN, json=asked)
            assert answer.status_code == 202, answer.text

            def phase() -> str | None:
                status = client.get("/weir/admin/models/smollm2/deployment", headers=ADMIN)
                operation = status.json()["operation"]
                return None if operation is None else str(operation["phase"])

            until(lambda: phase() in ("done", "failed"))
            assert phase() == "done"
            kv: KvRouting = client.app.state.proxy.dispatcher.kv  # type: ignore[attr-defined]
            key = VersionKey("smollm2", "v2")
            settings = kv.settings(key)
            assert settings is not None
            assert settings.block_size == 32  # its own engine flags
            counter = kv.counters.get(key)
            assert counter is not None  # the deploy's token counter, from v1's tokenizer
            tokens = prompt_tokens(counter, body)
            assert tokens is not None
            assert len(tokens) > 64
            hashes = settings.hasher().hashes(tokens, 32)
            v2 = next(r for r in client.app.state.proxy.dispatcher.fleet.replicas  # type: ignore[attr-defined]
                      if r.key.version_key == key)  # fmt: skip

            def held() -> bool:  # the engine at v2's URL stores the prompt's blocks
                publisher.publish(stored(hashes, tokens[: 32 * len(hashes)], 32))
                blocks = kv.index.blocks(v2)
                return blocks is not None and blocks.ready and blocks.matched(hashes) > 0

            until(held)
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200
            assert answer.headers["x-weir-model-version"] == "v2"
            decisions = kv.metrics.decisions
            assert decisions.labels("smollm2", "cache_hit")._value.get() == 1
            assert kv.metrics.predicted.labels("smollm2")._value.get() == 32 * len(hashes)
    finally:
        publisher.close()


# --- requests for LoRA adapters the gateway loaded --------------------------------------


class PathControl(FakeControl):
    """``FakeControl`` that also remembers the path each adapter was loaded from."""

    paths: dict[str, str]

    async def load(self, replica: Replica, name: str, path: Path) -> None:
        await super().load(replica, name, path)
        self.paths[name] = str(path)


def test_adapter_requests_are_keyed_with_the_path_the_gateway_loaded(tmp_path: Path) -> None:
    stored_adapters(tmp_path, "pirate")
    version = VersionConfig(version="v1", weights="smollm2-135m-instruct", lora=True, replicas=2)
    model = ModelConfig(name="smollm2", task="chat", current="v1", routing=KV_AWARE,
                        versions=[version])  # fmt: skip
    config = Settings(models=[model], keys=KeysConfig(admin_key="admin-secret"),
                      store={"path": tmp_path / "store"})  # fmt: skip
    engines: dict[str, LoraEngine] = {}

    def fleet(_: object) -> Fleet:
        made = []
        for index in range(2):
            key = ReplicaKey("smollm2", "v1", index)
            engine = engines.setdefault(str(key), LoraEngine(name=str(key)))
            made.append(Replica(key, engine, "smollm2"))
        return Fleet(made, health_interval_s=0.02)

    control = PathControl(engines)
    control.paths = {}
    counter = TokenCounter.from_dir(store_dir("smollm2-135m-instruct"))
    app = create_app(config, fleet_factory=fleet, adapter_control=lambda _: control,
                     counters={VersionKey("smollm2", "v1"): counter})  # fmt: skip
    body = {"model": "smollm2:pirate", "messages": [{"role": "user", "content": "hi " * 300}]}
    with TestClient(app) as client:
        until(lambda: "pirate" in control.paths)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        kv: KvRouting = client.app.state.proxy.dispatcher.kv  # type: ignore[attr-defined]
        decisions = kv.metrics.decisions
        # keyed (no engine publishes events here: no_events), not left out as before
        assert decisions.labels("smollm2", "no_events")._value.get() == 1
        assert decisions.labels("smollm2", "no_prefix")._value.get() == 0
        base = VersionKey("smollm2", "v1")
        assert client.app.state.adapters.path_of(base, "pirate") == control.paths["pirate"]  # type: ignore[attr-defined]
        assert client.app.state.adapters.path_of(base, "ghost") is None  # type: ignore[attr-defined]
