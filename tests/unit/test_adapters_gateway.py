"""LoRA adapters at the gateway, with fake engines: filled at start, served as
MODEL:ADAPTER (and pinned), added and removed at runtime, reloaded after a restart,
least recently used unloaded beyond max_loras, a failed load a 503 with its reason.

The same flows run against real vLLM engines in ``tests/integration/test_adapters_engine``.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from models.adapters.errors import AdapterLoadFailed
from models.adapters.store import AdapterStore, Base
from models.config import ModelConfig, VersionConfig
from models.engines.client import EngineStream
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.unit.test_adapter_store import make_adapter, make_base
from tests.windows import hold_limit_window

ADMIN = {"authorization": "Bearer admin-secret"}
JSON = dict[str, Any]


@dataclass
class LoraEngine(FakeEngine):
    """Answers for the base name or an adapter it holds (prefixing the adapter's name),
    and 404s (``EngineFailed``, as the client maps it) for any other, as vLLM does."""

    held: set[str] = field(default_factory=set)

    def _check(self, body: JSON) -> None:
        model = body["model"]
        if model != "smollm2" and model not in self.held:
            raise EngineFailed(f"The model `{model}` does not exist.", engine=self.name)

    async def complete(self, path: str, body: JSON) -> JSON:
        self._check(body)
        answer = await super().complete(path, body)
        if body["model"] != "smollm2":
            message = answer["choices"][0]["message"]
            message["content"] = f"[{body['model']}] {message['content']}"
        return answer

    async def open_stream(self, path: str, body: JSON) -> EngineStream:
        self._check(body)
        return await super().open_stream(path, body)


@dataclass
class FakeControl:
    """``AdapterControl`` on the fake engines: what each holds, what was asked of it."""

    engines: dict[str, LoraEngine]
    refuse: set[str] = field(default_factory=set)  # adapter names every engine refuses
    log: list[tuple[str, str, str]] = field(default_factory=list)

    async def load(self, replica: Replica, name: str, path: Path) -> None:
        self.log.append(("load", str(replica.key), name))
        if name in self.refuse:
            raise AdapterLoadFailed(f"engine {replica.key}: invalid adapter '{name}'")
        assert (path / "adapter_model.safetensors").is_file()
        self.engines[str(replica.key)].held.add(name)

    async def unload(self, replica: Replica, name: str) -> None:
        self.log.append(("unload", str(replica.key), name))
        self.engines[str(replica.key)].held.discard(name)


@dataclass
class Stack:
    client: TestClient
    engines: dict[str, LoraEngine]
    control: FakeControl
    store: AdapterStore
    fleet: list[Fleet]

    def chat(self, model: str, **extra: Any) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.client.post("/v1/chat/completions", json=body)


def settings(tmp_path: Path, max_loras: int = 4, replicas: int = 2, keys: bool = False) -> Settings:
    version = VersionConfig(version="v1", weights="smollm2-135m-instruct", lora=True,
                            max_loras=max_loras, replicas=replicas)  # fmt: skip
    chat = ModelConfig(name="smollm2", task="chat", current="v1", versions=[version])
    return Settings(
        models=[chat],
        keys=KeysConfig(admin_key="admin-secret", enabled=keys, file=tmp_path / "keys.json"),
        store={"path": tmp_path / "store"},
    )


def stored(tmp_path: Path, *names: str) -> AdapterStore:
    base = tmp_path / "base"
    if not base.exists():
        make_base(tmp_path)
    store = AdapterStore(tmp_path / "store")
    for name in names:
        store.add(name, make_adapter(tmp_path, name), Base("smollm2", "v1", base, 16))
    return store


@pytest.fixture
def stack(tmp_path: Path) -> Callable[..., contextlib.AbstractContextManager[Stack]]:
    @contextlib.contextmanager
    def make(max_loras: int = 4, replicas: int = 2, keys: bool = False) -> Iterator[Stack]:
        config = settings(tmp_path, max_loras, replicas, keys)
        engines: dict[str, LoraEngine] = {}
        fleets: list[Fleet] = []

        def fleet(_: object) -> Fleet:
            made = []
            for index in range(replicas):
                key = ReplicaKey("smollm2", "v1", index)
                engine = engines.setdefault(str(key), LoraEngine(name=str(key)))
                made.append(Replica(key, engine, "smollm2"))
            fleets.append(Fleet(made, health_interval_s=0.02))
            return fleets[-1]

        control = FakeControl(engines)
        app = create_app(config, fleet_factory=fleet, counters={},
                         adapter_control=lambda _: control)  # fmt: skip
        with TestClient(app) as client:
            yield Stack(client, engines, control, AdapterStore(tmp_path / "store"), fleets)

    return make


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_stored_adapters_serve_as_model_colon_adapter(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack() as s:
        assert all(e.held == {"pirate"} for e in s.engines.values())  # every replica, at start
        answer = s.chat("smollm2:pirate")
        assert answer.status_code == 200
        assert answer.headers["x-weir-model-version"] == "v1:pirate"
        assert answer.json()["model"] == "smollm2:pirate"
        assert answer.json()["choices"][0]["message"]["content"].startswith("[pirate] ")
        pinned = s.chat("smollm2@v1:pirate")
        assert pinned.headers["x-weir-model-version"] == "v1:pirate"
        by_header = s.client.post(
            "/v1/chat/completions",
            json={"model": "smollm2:pirate", "messages": [{"role": "user", "content": "x"}]},
            headers={"x-weir-model-version": "v1"},
        )
        assert by_header.headers["x-weir-model-version"] == "v1:pirate"
        base = s.chat("smollm2")
        assert base.headers["x-weir-model-version"] == "v1"
        assert not base.json()["choices"][0]["message"]["content"].startswith("[")
        assert s.chat("smollm2:ghost").json()["error"]["code"] == "model_not_found"
        assert s.chat("smollm2@v2:pirate").json()["error"]["code"] == "model_not_found"
        cards = {c["id"]: c for c in s.client.get("/v1/models").json()["data"]}
        assert cards["smollm2:pirate"]["parent"] == "smollm2@v1"
        assert cards["smollm2@v1:pirate"]["parent"] == "smollm2@v1"
        assert "parent" not in cards["smollm2"]
        one = s.client.get("/v1/models/smollm2:pirate").json()
        assert one["parent"] == "smollm2@v1"
        assert s.client.get("/v1/models/smollm2:ghost").status_code == 404


def test_add_at_runtime_loads_everywhere_and_remove_unloads(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path)
    with stack() as s:
        assert s.chat("smollm2:robot").status_code == 404
        s.store.add("robot", make_adapter(tmp_path, "robot"),
                    Base("smollm2", "v1", tmp_path / "base", 16))  # fmt: skip
        added = s.client.post("/weir/admin/adapters", json={"name": "robot"}, headers=ADMIN)
        assert added.status_code == 200, added.text
        assert [r["holds"] for r in added.json()["replicas"]] == [True, True]
        assert all(e.held == {"robot"} for e in s.engines.values())
        assert s.chat("smollm2:robot").status_code == 200
        listed = s.client.get("/weir/admin/adapters", headers=ADMIN).json()["data"]
        assert [a["model"] for a in listed] == ["smollm2:robot"]
        gone = s.client.delete("/weir/admin/adapters/robot", headers=ADMIN)
        assert gone.status_code == 200
        assert all(e.held == set() for e in s.engines.values())
        assert s.chat("smollm2:robot").json()["error"]["code"] == "model_not_found"
        missing = s.client.post("/weir/admin/adapters", json={"name": "ghost"}, headers=ADMIN)
        assert missing.status_code == 404
        assert "weir adapters add ghost" in missing.json()["error"]["message"]
        assert s.client.post("/weir/admin/adapters", json={"name": "x"}).status_code == 401


def test_a_restarted_replica_is_filled_again(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack(replicas=1) as s:
        engine = s.engines["smollm2@v1#0"]
        replica = s.fleet[0].replicas[0]
        engine.healthy = False  # the engine restarts: it comes back holding nothing
        until(lambda: not replica.healthy)
        engine.held.clear()
        engine.healthy = True
        until(lambda: replica.healthy)
        until(lambda: engine.held == {"pirate"})
        assert s.chat("smollm2:pirate").status_code == 200


def test_least_recently_used_is_unloaded_beyond_max_loras(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "a1", "a2", "a3")
    with stack(max_loras=2, replicas=1) as s:
        engine = s.engines["smollm2@v1#0"]
        assert engine.held == {"a1", "a2"}  # filled up to max_loras at start
        assert s.chat("smollm2:a1").status_code == 200  # a1 used: a2 is the least recent
        assert s.chat("smollm2:a3").status_code == 200  # loaded on demand, a2 unloaded
        assert engine.held == {"a1", "a3"}
        assert ("unload", "smollm2@v1#0", "a2") in s.control.log
        metrics = s.client.get("/metrics").text
        assert 'weir_adapter_evictions_total{model="smollm2",model_version="v1"} 1.0' in metrics
        assert s.chat("smollm2:a2").status_code == 200  # and back again, a1 out now
        assert engine.held == {"a3", "a2"}


def test_a_failed_load_is_a_503_with_the_reason_and_the_rest_serve(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack() as s:
        s.control.refuse.add("bad")
        s.store.add("bad", make_adapter(tmp_path, "bad"),
                    Base("smollm2", "v1", tmp_path / "base", 16))  # fmt: skip
        refused = s.client.post("/weir/admin/adapters", json={"name": "bad"}, headers=ADMIN)
        assert refused.status_code == 503
        assert "invalid adapter 'bad'" in refused.json()["error"]["message"]
        assert s.chat("smollm2:bad").status_code == 404  # never served
        assert s.chat("smollm2:pirate").status_code == 200
        assert s.chat("smollm2").status_code == 200


def key(s: Stack, *models: str) -> dict[str, str]:
    made = s.client.post("/weir/admin/keys", json={"name": "t", "models": list(models)},
                         headers=ADMIN).json()  # fmt: skip
    return {"authorization": f"Bearer {made['key']}"}


def test_key_permissions_name_the_adapter(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack(keys=True) as s:
        pirate, base = key(s, "smollm2:pirate"), key(s, "smollm2")

        def status(model: str, headers: dict[str, str]) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return s.client.post("/v1/chat/completions", json=body, headers=headers).status_code

        assert status("smollm2:pirate", pirate) == 200
        assert status("smollm2@v1:pirate", pirate) == 200
        assert status("smollm2", pirate) == 403
        assert status("smollm2", base) == 200
        assert status("smollm2:pirate", base) == 403
        assert status("smollm2@v1:pirate", base) == 403  # a pin is no way around it
        listed = s.client.get("/v1/models", headers=pirate).json()["data"]
        assert sorted(c["id"] for c in listed) == ["smollm2:pirate", "smollm2@v1:pirate"]


def test_an_adapter_has_its_own_model_budget(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack(keys=True) as s:
        hold_limit_window(s.client.app)  # its minute never ends under the test
        both = key(s)
        put = s.client.put("/weir/admin/limits/models/smollm2:pirate", json={"tpm": 25},
                           headers=ADMIN)  # fmt: skip
        assert put.status_code == 200
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}

        def status(model: str) -> int:
            answer = s.client.post("/v1/chat/completions", json={**body, "model": model},
                                   headers=both)  # fmt: skip
            return answer.status_code

        assert status("smollm2:pirate") == 200
        assert status("smollm2@v1:pirate") == 429  # the adapter's 25 tokens are spent
        assert [status("smollm2") for _ in range(3)] == [200, 200, 200]  # not the base's


def test_cache_metrics_and_budgets_are_the_adapters_own(
    tmp_path: Path, stack: Callable[..., contextlib.AbstractContextManager[Stack]]
) -> None:
    stored(tmp_path, "pirate")
    with stack() as s:
        same = {"temperature": 0, "max_tokens": 8}
        assert s.chat("smollm2", **same).headers["x-weir-cache"] == "miss"
        assert s.chat("smollm2", **same).headers["x-weir-cache"] == "hit"
        first = s.chat("smollm2:pirate", **same)  # the base's answer never serves it
        assert first.headers["x-weir-cache"] == "miss"
        assert first.json()["choices"][0]["message"]["content"].startswith("[pirate] ")
        again = s.chat("smollm2@v1:pirate", **same)
        assert again.headers["x-weir-cache"] == "hit"
        assert again.json()["choices"][0]["message"]["content"].startswith("[pirate] ")
        metrics = s.client.get("/metrics").text
        assert 'model="smollm2",model_version="v1:pirate"' in metrics
        loads = 'weir_adapter_loads_total{adapter="pirate",model="smollm2",model_version="v1"'
        assert loads + ',result="ok"} 2.0' in metrics  # one load on each replica


def test_canary_between_two_adapters_then_rollback(tmp_path: Path) -> None:
    """``support-bot``: a model whose versions are adapters on smollm2@v1, rolled out with
    the rollout verbs: a 25% canary gives the new adapter exactly a quarter, a rollback
    takes it back, and the base model serves all along."""
    store = stored(tmp_path, "pirate")
    config = settings(tmp_path, replicas=1)
    bot = ModelConfig(name="support-bot", task="chat", current="v1", versions=[
        VersionConfig(version="v1", base="smollm2@v1", adapter="pirate"),
        VersionConfig(version="v2", base="smollm2@v1", adapter="robot", standby=True),
    ])  # fmt: skip
    config = config.model_copy(update={"models": [*config.models, bot]})
    engine = LoraEngine(name="smollm2@v1#0")

    def fleet(_: object) -> Fleet:
        return Fleet([Replica(ReplicaKey("smollm2", "v1", 0), engine, "smollm2")])

    control = FakeControl({"smollm2@v1#0": engine})
    app = create_app(config, fleet_factory=fleet, counters={},
                     adapter_control=lambda _: control)  # fmt: skip
    with TestClient(app) as client:

        def served(n: int) -> Counter[tuple[str, str]]:
            body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
            answers = [client.post("/v1/chat/completions", json=body) for _ in range(n)]
            return Counter(
                (a.headers["x-weir-model-version"], a.json()["choices"][0]["message"]["content"])
                for a in answers
            )

        assert engine.held == {"pirate"}  # the running version's adapter, loaded at start
        assert served(4) == {("v1", "[pirate] Hello there!"): 4}
        robot = make_adapter(tmp_path, "robot")
        store.add("robot", robot, Base("smollm2", "v1", tmp_path / "base", 16))  # stored only
        deploy = client.post("/weir/admin/models/support-bot/deploy",
                             json={"version": "v2", "canary": 25}, headers=ADMIN)  # fmt: skip
        assert deploy.status_code == 202, deploy.text
        status = wait_phase(client)
        assert status["split"] == {"v1": 0.75, "v2": 0.25}
        steps = [s["phase"] for s in status["operation"]["steps"]]
        assert steps == ["loaded", "canary"]  # no engine started
        assert engine.held == {"pirate", "robot"}
        assert served(40) == {("v1", "[pirate] Hello there!"): 30,
                              ("v2", "[robot] Hello there!"): 10}  # fmt: skip
        pinned = client.post("/v1/chat/completions", json={
            "model": "support-bot@v2", "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        assert pinned.headers["x-weir-model-version"] == "v2"
        busy = client.delete("/weir/admin/adapters/robot", headers=ADMIN)
        assert busy.status_code == 422  # support-bot@v2 serves it
        assert "support-bot@v2" in busy.json()["error"]["message"]
        back = client.post("/weir/admin/models/support-bot/rollback", headers=ADMIN)
        assert back.status_code == 202
        assert wait_phase(client)["operation"]["phase"] == "rolled_back"
        assert served(8) == {("v1", "[pirate] Hello there!"): 8}
        base = client.post("/v1/chat/completions", json={
            "model": "smollm2", "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        assert base.json()["choices"][0]["message"]["content"] == "Hello there!"


def wait_phase(client: TestClient, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(
            "/weir/admin/models/support-bot/deployment", headers=ADMIN
        ).json()
        operation = status["operation"]
        if operation and operation["phase"] in ("canary", "rolled_back", "failed", "done"):
            return status
        time.sleep(0.02)
    raise AssertionError("the rollout did not end")
