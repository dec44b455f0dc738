"""The environment each started engine process actually gets from its placement.

The launcher starts ``tests.fakes.engine_server`` in vLLM's place (same flags, same
guard, same pinning); the test reads what the kernel says the engine process has:
``/proc/PID/environ``, ``/proc/PID/cmdline`` and its CPU affinity.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import psutil
import pytest
from starlette.testclient import TestClient

from models.config import EngineConfig, ModelConfig, VersionConfig
from models.engines.client import EngineTimeouts
from models.engines.fleet import Fleet, Replica
from models.engines.launcher import ReplicaFactory, build_fleet
from models.engines.placement import CpuHost, Gpu, GpuHost, Host, Placement
from models.engines.placement.types import GIB
from models.types import ReplicaKey, VersionKey
from serving.http.app import create_app
from serving.settings import DeployConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.anyio
FAKE = "tests.fakes.engine_server"


def models() -> list[ModelConfig]:
    return [
        ModelConfig(name="chat", task="chat", current="v1", versions=[
            VersionConfig(version="v1", weights="chat-w"),
            VersionConfig(version="v2", weights="chat-w", standby=True),
        ]),
        ModelConfig(name="embed", task="embed", current="v1",
                    versions=[VersionConfig(version="v1", weights="embed-w")]),
    ]  # fmt: skip


def factory(tmp_path: Path, kind: Literal["cpu", "cuda"], host: Host) -> ReplicaFactory:
    engines = EngineConfig(host=kind, log_dir=tmp_path / "logs", stop_grace_s=2.0)
    return ReplicaFactory(engines, EngineTimeouts(health_s=0.5), machine=host, server=FAKE)


def weights(tmp_path: Path, names: list[str]) -> dict[VersionKey, Path]:
    found = {}
    for key in names:
        model, version = key.split("@")
        directory = tmp_path / key
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"\0" * 1024)
        found[VersionKey(model, version)] = directory
    return found


def engine_of(replica: Replica, timeout_s: float = 20.0) -> psutil.Process:
    """The engine process (the guard's child) once it is up."""
    assert replica.process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        guard = replica.process.pid
        children = psutil.Process(guard).children() if guard else []
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"{replica.key}: no engine process under its guard")


def environ(process: psutil.Process) -> dict[str, str]:
    raw = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


@asynccontextmanager
async def started(fleet: Fleet) -> AsyncIterator[Fleet]:
    await fleet.start()
    try:
        if not await fleet.wait_ready(20):
            raise AssertionError(f"fake engines not healthy: {fleet}")
        yield fleet
    finally:
        await fleet.stop()


async def test_gpu_host_engines_get_their_gpu_and_a_memory_fraction(tmp_path: Path) -> None:
    host = GpuHost(tuple(Gpu(i, 80 * GIB, 79 * GIB) for i in range(2)))
    made = factory(tmp_path, "cuda", host)
    fleet = build_fleet(models(), weights(tmp_path, ["chat@v1", "embed@v1"]), made)
    async with started(fleet):
        seen = {}
        for replica in fleet.replicas:
            engine = await asyncio.to_thread(engine_of, replica)
            cmdline = engine.cmdline()
            fraction = cmdline[cmdline.index("--gpu-memory-utilization") + 1]
            seen[str(replica.key)] = (environ(engine)["CUDA_VISIBLE_DEVICES"], fraction)
    assert seen == {"chat@v1#0": ("0", "0.9"), "embed@v1#0": ("1", "0.9")}


async def test_one_gpu_shared_by_two_engines_gives_fractions_that_fit(tmp_path: Path) -> None:
    host = GpuHost((Gpu(3, 24 * GIB, 24 * GIB),))
    made = factory(tmp_path, "cuda", host)
    fleet = build_fleet(models(), weights(tmp_path, ["chat@v1", "embed@v1"]), made)
    async with started(fleet):
        fractions = []
        for replica in fleet.replicas:
            engine = await asyncio.to_thread(engine_of, replica)
            assert environ(engine)["CUDA_VISIBLE_DEVICES"] == "3"
            cmdline = engine.cmdline()
            fractions.append(float(cmdline[cmdline.index("--gpu-memory-utilization") + 1]))
    assert all(f >= 3.5 / 24 for f in fractions)  # each at least its need (3.5 GiB)
    assert 0.85 < sum(fractions) <= 0.9


async def test_cpu_host_engines_and_a_deployed_version_get_cores_of_their_own(
    tmp_path: Path,
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.fail("this test needs two cores to place two engines apart")
    host = CpuHost((cores[0], cores[1]))
    made = factory(tmp_path, "cpu", host)
    chat_only = [models()[0]]
    found = weights(tmp_path, ["chat@v1", "chat@v2"])
    fleet = build_fleet(chat_only, found, made)
    async with started(fleet):
        (v1,) = fleet.replicas
        engine = await asyncio.to_thread(engine_of, v1)
        assert environ(engine)["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[0])
        assert engine.cpu_affinity() == [cores[0]]
        # a deploy of v2 beside it, as the deployer plans it: the other core
        model, v2 = chat_only[0], chat_only[0].version("v2")
        plan = made.plan_deploy(
            model, v2, found[VersionKey("chat", "v2")], host=host,
            running=fleet.placements(), replacing=VersionKey("chat", "v1"),
        )  # fmt: skip
        assert plan.kind == "beside"
        added = made(model, v2, found[VersionKey("chat", "v2")], plan.placements)
        await fleet.add(added)
        assert await fleet.wait_healthy(added, 20) is None
        new = await asyncio.to_thread(engine_of, added[0])
        assert environ(new)["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[1])
        assert new.cpu_affinity() == [cores[1]]


ADMIN = {"authorization": "Bearer admin-secret"}


def loadable(directory: Path) -> Path:
    """The smallest weights directory a deploy's checks accept (config, tokenizer, one
    safetensors tensor)."""
    import json

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(directory / "tokenizer.json")
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (directory / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4
    )
    return directory


def gpu_gateway(tmp_path: Path, host: GpuHost, fractions: list[float]) -> TestClient:
    """A gateway whose chat@v1 runs (fake engines) at ``fractions`` of GPU 0, v2 on
    standby; deploys start ``tests.fakes.engine_server`` through the real launcher."""
    weights = loadable(tmp_path / "weights")
    chat = ModelConfig(name="chat", task="chat", current="v1", versions=[
        VersionConfig(version="v1", weights=str(weights), replicas=len(fractions)),
        VersionConfig(version="v2", weights=str(weights), replicas=len(fractions),
                      standby=True),
    ])  # fmt: skip
    settings = Settings(
        models=[chat],
        keys=KeysConfig(admin_key="admin-secret"),
        store={"path": tmp_path / "store"},
        engines={"host": "cuda", "log_dir": tmp_path / "logs", "stop_grace_s": 2.0},
        deploy=DeployConfig(warm_requests=0, start_timeout_s=20),
    )
    made = ReplicaFactory(settings.engines, EngineTimeouts(health_s=0.5), machine=host,
                          server=FAKE)  # fmt: skip

    def fleet(_: object) -> Fleet:
        running = []
        for index, fraction in enumerate(fractions):
            key = ReplicaKey("chat", "v1", index)
            where = Placement(key, gpus=(0,), memory_fraction=fraction)
            running.append(Replica(key, FakeEngine(name=str(key)), "chat", placement=where))
        return Fleet(running, health_interval_s=0.05, host=host)

    app = create_app(settings, fleet_factory=fleet, replicas_factory=lambda _: made, counters={})
    return TestClient(app)


def test_a_deploy_onto_a_full_gpu_is_refused_before_anything_starts(tmp_path: Path) -> None:
    host = GpuHost((Gpu(0, 24 * GIB, 24 * GIB),))
    with gpu_gateway(tmp_path, host, [0.9]) as client:
        answer = client.post("/weir/admin/models/chat/deploy", headers=ADMIN,
                             json={"version": "v2"})  # fmt: skip
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert "chat@v2 does not fit: a replica needs 3.5 GiB on each of 1 GPU(s)" in message
        assert "GPU 0 0.0 GiB of 24.0 GiB" in message
        status = client.get("/weir/admin/models/chat/deployment", headers=ADMIN).json()
        assert status["running"] == ["v1"]
        assert status["operation"] is None
    assert not (tmp_path / "logs").exists()  # no engine was started


def test_a_full_gpu_with_two_replicas_offers_the_rolling_swap(tmp_path: Path) -> None:
    host = GpuHost((Gpu(0, 24 * GIB, 24 * GIB),))
    with gpu_gateway(tmp_path, host, [0.45, 0.45]) as client:
        answer = client.post("/weir/admin/models/chat/deploy", headers=ADMIN,
                             json={"version": "v2"})  # fmt: skip
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert "A rolling swap would fit (capacity reduced, never zero)" in message
        assert "stop chat@v1#1, start chat@v2#0 on GPU 0 at 0.45" in message
        assert "then stop chat@v1#0, start chat@v2#1 on GPU 0 at 0.45" in message


def test_a_deploy_starts_the_new_version_on_a_free_gpu(tmp_path: Path) -> None:
    host = GpuHost((Gpu(0, 24 * GIB, 24 * GIB), Gpu(1, 24 * GIB, 24 * GIB)))
    with gpu_gateway(tmp_path, host, [0.9]) as client:
        answer = client.post("/weir/admin/models/chat/deploy", headers=ADMIN,
                             json={"version": "v2"})  # fmt: skip
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 30
        status = client.get("/weir/admin/models/chat/deployment", headers=ADMIN).json()
        while status["operation"]["phase"] not in ("done", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
            status = client.get("/weir/admin/models/chat/deployment", headers=ADMIN).json()
        assert status["operation"]["phase"] == "done", status
        placed = next(s for s in status["operation"]["steps"] if s["phase"] == "placed")
        assert placed["on"] == ["chat@v2#0 on GPU 1 at 0.9"]
        (engine,) = client.get("/weir/engines", headers=ADMIN).json()["data"]
        assert engine["placement"]["gpus"] == [1]
        started = psutil.Process(engine["pid"]).children()[0]
        assert environ(started)["CUDA_VISIBLE_DEVICES"] == "1"
        cmdline = started.cmdline()
        assert cmdline[cmdline.index("--gpu-memory-utilization") + 1] == "0.9"
