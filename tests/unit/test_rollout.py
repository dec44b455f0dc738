"""Deploys, canaries, gates and rollbacks at the gateway, with fake engines.

The same flows run against real vLLM engines in ``tests/integration/test_deploy_engine``;
here the fakes make failures (an engine that never gets healthy, a warm-up that fails, a
slow canary) happen on demand.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.rollout import gate
from serving.rollout.state import RolloutState
from serving.rollout.tracker import Sample
from serving.settings import DeployConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine

ADMIN = {"authorization": "Bearer admin-secret"}
CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
ENDED = ("done", "failed", "promoted", "rolled_back", "canary")


def settings(tmp_path: Path, **deploy: Any) -> Settings:
    chat = ModelConfig(
        name="smollm2", task="chat", current="v1",
        versions=[
            VersionConfig(version="v1", url="http://unused-1"),
            VersionConfig(version="v2", url="http://unused-2", standby=True),
        ],
    )  # fmt: skip
    embed = ModelConfig(
        name="minilm", task="embed", current="l6", versions=[VersionConfig(version="l6", url="x")]
    )
    return Settings(
        models=[chat, embed],
        keys=KeysConfig(admin_key="admin-secret"),
        deploy=DeployConfig(**{"start_timeout_s": 2.0, "warm_requests": 1, **deploy}),
        store={"path": tmp_path / "store"},
    )


def client_for(config: Settings, engines: dict[str, FakeEngine]) -> TestClient:
    """Fake engines by replica key; a deploy makes its replicas from ``engines`` too."""

    def replicas(model: ModelConfig, version: VersionConfig) -> list[Replica]:
        made = []
        for index in range(version.replica_count):
            key = ReplicaKey(model.name, version.version, index)
            engine = engines.setdefault(str(key), FakeEngine(name=str(key)))
            made.append(Replica(key, engine, model.name))
        return made

    def fleet(_: object) -> Fleet:
        state = config.deploy.state_file
        models = RolloutState(state).apply(config.models) if state else config.models
        made = [
            replica
            for model in models
            for version in model.versions
            if version.version in model.running()
            for replica in replicas(model, version)
        ]
        return Fleet(made, health_interval_s=0.05)

    def maker(_: object) -> Any:
        return lambda model, version, weights: replicas(model, version)

    app = create_app(config, fleet_factory=fleet, replicas_factory=maker, counters={})
    return TestClient(app)


def wait_done(
    client: TestClient, timeout_s: float = 20, ended: tuple[str, ...] = ENDED
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(
            "/weir/admin/models/smollm2/deployment", headers=ADMIN
        ).json()
        operation = status["operation"]
        if operation is not None and operation["phase"] in ended:
            return status
        time.sleep(0.02)
    raise AssertionError(f"rollout did not finish: {status}")


def versions_served(client: TestClient, n: int) -> Counter[str]:
    return Counter(
        client.post("/v1/chat/completions", json=CHAT).headers["x-weir-model-version"]
        for _ in range(n)
    )


def test_full_deploy_switches_drains_and_stops_the_old_version(tmp_path: Path) -> None:
    engines: dict[str, FakeEngine] = {}
    with client_for(settings(tmp_path), engines) as client:
        assert versions_served(client, 3) == {"v1": 3}
        assert (
            client.post("/v1/chat/completions", json={**CHAT, "model": "smollm2@v2"}).json()[
                "error"
            ]["code"]
            == "model_not_found"
        )  # standby: not running yet
        engines["smollm2@v1#0"].hang_s = 0.5  # a request in flight on v1 during the switch
        slow: list[Any] = []
        caller = threading.Thread(
            target=lambda: slow.append(client.post("/v1/chat/completions", json=CHAT))
        )
        caller.start()
        deadline = time.monotonic() + 10  # the slow request has reached v1's engine
        while len(engines["smollm2@v1#0"].calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engines["smollm2@v1#0"].calls) == 4
        answer = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN,
                             json={"version": "v2"})  # fmt: skip
        assert answer.status_code == 202, answer.text
        status = wait_done(client)
        caller.join()
        assert slow[0].status_code == 200
        assert slow[0].headers["x-weir-model-version"] == "v1"
        assert status["operation"]["phase"] == "done", status
        phases = [s["phase"] for s in status["operation"]["steps"]]
        assert phases == ["starting", "warming", "shifted", "draining", "stopping", "stopped",
                          "done"]  # fmt: skip
        assert status["current"] == "v2"
        assert status["running"] == ["v2"]
        assert status["previous"] == "v1"
        assert versions_served(client, 5) == {"v2": 5}
        pinned = client.post("/v1/chat/completions", json={**CHAT, "model": "smollm2@v1"})
        assert pinned.status_code == 404
        assert "not running" in pinned.json()["error"]["message"]
        fleet = client.app.state.proxy.fleet  # type: ignore[attr-defined]
        assert [str(r.key) for r in fleet.replicas if r.key.model == "smollm2"] == ["smollm2@v2#0"]
        cards = [c["id"] for c in client.get("/v1/models").json()["data"]]
        assert "smollm2@v2" in cards
        assert "smollm2@v1" not in cards
        # and back
        assert client.post("/weir/admin/models/smollm2/rollback", headers=ADMIN).status_code == 202
        status = wait_done(client)
        assert status["operation"]["kind"] == "rollback"
        assert status["current"] == "v1"
        assert versions_served(client, 3) == {"v1": 3}
        assert status["previous"] == "v2"


def test_canary_takes_its_share_and_rollback_ends_it(tmp_path: Path) -> None:
    with client_for(settings(tmp_path), {}) as client:
        answer = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN,
                             json={"version": "v2", "canary": 25})  # fmt: skip
        assert answer.status_code == 202
        status = wait_done(client)
        assert status["operation"]["phase"] == "canary"
        assert status["split"] == {"v1": 0.75, "v2": 0.25}
        assert versions_served(client, 400) == {"v1": 300, "v2": 100}
        again = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN,
                            json={"version": "v2", "canary": 50})  # fmt: skip
        assert again.status_code == 422
        assert "promote" in again.json()["error"]["message"]
        client.post("/weir/admin/models/smollm2/rollback", headers=ADMIN)
        status = wait_done(client)
        assert status["operation"]["phase"] == "rolled_back"
        assert status["split"] == {"v1": 1.0}
        assert status["running"] == ["v1"]
        assert versions_served(client, 10) == {"v1": 10}


def test_refusals_change_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with client_for(settings(tmp_path), {}) as client:
        cases = [
            ({"version": "v9"}, "weir models add smollm2 --version v9"),
            ({"version": "v3", "weights": str(broken)}, "tokenizer.json does not load"),
            ({"version": "v1"}, "already serves all"),
            ({"version": "v2", "promote_if": "ttft_p95<1.2x"}, "give canary"),
            ({"version": "v2", "canary": 10, "promote_if": "speed>2"}, "cannot read"),
        ]
        for body, says in cases:
            answer = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN, json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert says in answer.json()["error"]["message"], answer.json()
        assert client.post("/weir/admin/models/nope/deploy", headers=ADMIN,
                           json={"version": "v1"}).status_code == 404  # fmt: skip
        assert client.post("/weir/admin/models/smollm2/deploy",
                           json={"version": "v2"}).status_code == 401  # fmt: skip
        assert client.post("/weir/admin/models/smollm2/rollback", headers=ADMIN).status_code == 422
        status = client.get("/weir/admin/models/smollm2/deployment", headers=ADMIN).json()
        assert status["current"] == "v1"
        assert status["running"] == ["v1"]
        assert status["operation"] is None


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        (FakeEngine(healthy=False), "not healthy after 2s"),
        (FakeEngine(fail_with=EngineFailed("boom")), "warm-up request to smollm2@v2#0 failed"),
    ],
)
def test_a_version_that_fails_to_start_or_warm_changes_nothing(
    tmp_path: Path, broken: FakeEngine, says: str
) -> None:
    with client_for(settings(tmp_path), {"smollm2@v2#0": broken}) as client:
        client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN, json={"version": "v2"})
        busy = client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN,
                           json={"version": "v2"})  # fmt: skip
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "deploy_in_progress"
        status = wait_done(client)
        assert status["operation"]["phase"] == "failed"
        assert says in status["operation"]["error"]
        assert status["current"] == "v1"
        assert status["running"] == ["v1"]
        assert [r["replica"] for r in status["replicas"]] == ["smollm2@v1#0"]
        assert versions_served(client, 5) == {"v1": 5}


SLOW_S = 0.2  # the slow side's fake latency; the fast side's is 0


def gated(client: TestClient, window_s: float) -> dict[str, Any]:
    """A 50% canary gated on ``ttft_p95<1.5x``, with four callers sending until the gate
    decides (enough canary requests whichever side is slow)."""
    answer = client.post(
        "/weir/admin/models/smollm2/deploy", headers=ADMIN,
        json={"version": "v2", "canary": 50, "promote_if": "ttft_p95<1.5x,errors<5%",
              "window_s": window_s, "min_requests": 10},
    )  # fmt: skip
    assert answer.status_code == 202, answer.text
    decided = threading.Event()

    def call() -> None:
        while not decided.is_set():
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    try:
        return wait_done(client, window_s + 20, ended=("promoted", "rolled_back", "failed"))
    finally:
        decided.set()
        for caller in callers:
            caller.join()


# The two versions' latencies are 0 and SLOW_S: a sleep never returns early, so the slow
# side's TTFTs are at least SLOW_S whatever the host does, and the fast side's p95 would
# have to take 1.5 x SLOW_S (300 ms) of scheduler noise, or the slow side's fall under
# SLOW_S / 1.5, for a verdict to flip. (20 ms against 20 ms decided on noise.)


def test_a_slow_canary_is_rolled_back_by_its_gate(tmp_path: Path) -> None:
    engines = {"smollm2@v1#0": FakeEngine(), "smollm2@v2#0": FakeEngine(hang_s=SLOW_S)}
    with client_for(settings(tmp_path), engines) as client:
        status = gated(client, window_s=1.5)
        decision = status["operation"]["decision"]
        assert status["operation"]["phase"] == "rolled_back", decision
        assert decision["promote"] is False
        assert decision["canary"]["requests"] >= 10  # judged on latency, not on traffic
        assert any("ttft_p95<1.5x" in r and "fails" in r for r in decision["reasons"])
        assert decision["canary"]["ttft_p95_ms"] >= SLOW_S * 1000
        assert status["running"] == ["v1"]
        assert versions_served(client, 4) == {"v1": 4}


def test_a_healthy_canary_is_promoted_by_its_gate(tmp_path: Path) -> None:
    engines = {"smollm2@v1#0": FakeEngine(hang_s=SLOW_S), "smollm2@v2#0": FakeEngine()}
    with client_for(settings(tmp_path), engines) as client:
        status = gated(client, window_s=1.5)
        decision = status["operation"]["decision"]
        assert status["operation"]["phase"] == "promoted", decision
        assert decision["promote"] is True
        assert decision["canary"]["requests"] >= 10
        assert decision["stable"]["ttft_p95_ms"] >= SLOW_S * 1000
        assert all(r.endswith("(ok)") for r in decision["reasons"]), decision["reasons"]
        assert status["current"] == "v2"
        assert status["running"] == ["v2"]


def test_a_restarted_gateway_serves_what_was_deployed(tmp_path: Path) -> None:
    config = settings(tmp_path, state_file=tmp_path / "rollouts.json")
    with client_for(config, {}) as client:
        client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN, json={"version": "v2"})
        assert wait_done(client)["current"] == "v2"
    with client_for(config, {}) as client:
        status = client.get("/weir/admin/models/smollm2/deployment", headers=ADMIN).json()
        assert status["current"] == "v2"
        assert status["running"] == ["v2"]
        assert status["previous"] == "v1"
        assert versions_served(client, 3) == {"v2": 3}


def test_split_among_running_versions(tmp_path: Path) -> None:
    with client_for(settings(tmp_path), {}) as client:
        client.post("/weir/admin/models/smollm2/deploy", headers=ADMIN,
                    json={"version": "v2", "canary": 10})  # fmt: skip
        wait_done(client)
        answer = client.put("/weir/admin/models/smollm2/split", headers=ADMIN,
                            json={"split": {"v1": 1, "v2": 1}})  # fmt: skip
        assert answer.json()["split"] == {"v1": 0.5, "v2": 0.5}
        assert versions_served(client, 10) == {"v1": 5, "v2": 5}
        refused = client.put("/weir/admin/models/smollm2/split", headers=ADMIN,
                             json={"split": {"v7": 1}})  # fmt: skip
        assert refused.status_code == 422


def samples(ttfts: list[float], errors: int = 0) -> list[Sample]:
    return [Sample(0.0, t, False) for t in ttfts] + [Sample(0.0, None, True)] * errors


def test_gate_terms_and_verdicts() -> None:
    terms = gate.parse("ttft_p95<1.2x, errors<1%,ttft_p99<800ms")
    assert [str(t) for t in terms] == ["ttft_p95<1.2x", "errors<1%", "ttft_p99<800ms"]
    stable = samples([0.1] * 100)
    assert gate.judge(terms, samples([0.11] * 100), stable, 20).promote
    slow = gate.judge(terms, samples([0.2] * 100), stable, 20)
    assert not slow.promote
    assert "2.00x (fails)" in slow.reasons[0]
    failing = gate.judge(terms, samples([0.1] * 98, errors=2), stable, 20)
    assert not failing.promote
    assert "errors 2.00%" in failing.reasons[1]
    assert not gate.judge(terms, samples([0.1] * 5), stable, 20).promote  # too few to judge
    for bad in ("ttft_p95>1x", "errors<5ms", "ttft_p100<1x", "latency<1s", ""):
        with pytest.raises(gate.GateSyntaxError):
            gate.parse(bad)
