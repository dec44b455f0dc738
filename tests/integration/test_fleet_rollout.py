"""Fleet-wide rollouts (issue 26): two gateway processes share the rollout state in a
real Redis; ``weir deploy`` goes to one, ``weir rollback`` to the other, open-loop load
runs through both: no request fails and both switch within a second of each other."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx

from bench.config_builder import weir_toml
from bench.procs import start, stop_all, wait_for, weir_command
from tests import ports
from tests.redis_server import RedisServer

ADMIN = "admin-fleet-test"
RATE = 40  # requests/s per gateway, sent on a schedule (open loop)
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
Sample = tuple[str, float, int, str]  # gateway, sent at, status, version that answered


async def load(bases: dict[str, str], stop: asyncio.Event, out: list[Sample]) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:

        async def one(name: str, base: str) -> None:
            sent = time.monotonic()
            try:
                answer = await client.post(f"{base}/v1/chat/completions", json=BODY)
                out.append((name, sent, answer.status_code,
                            answer.headers.get("x-weir-model-version", "")))  # fmt: skip
            except httpx.HTTPError as exc:
                out.append((name, sent, 0, type(exc).__name__))

        pending: set[asyncio.Task[None]] = set()
        start_at, n = time.monotonic(), 0
        while not stop.is_set():
            for name, base in bases.items():
                task = asyncio.create_task(one(name, base))
                pending.add(task)
                task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(max(0.0, start_at + n / RATE - time.monotonic()))
        await asyncio.gather(*pending)


def switch_at(samples: list[Sample], gateway: str, to: str, after: float) -> float:
    """When ``gateway`` answered with ``to`` from then on (the first such request sent)."""
    mine = sorted((s for s in samples if s[0] == gateway and s[1] >= after), key=lambda s: s[1])
    last_other = max((s[1] for s in mine if s[3] != to), default=after)
    return min(s[1] for s in mine if s[3] == to and s[1] >= last_other)


def admin(args: list[str], config: Path, base: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [weir_command(), "--config", str(config), *args, "--url", base],
        capture_output=True, text=True, timeout=120, env={"WEIR_ADMIN_KEY": ADMIN, "PATH": ""},
    )  # fmt: skip


def test_deploy_and_rollback_switch_every_gateway_together(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    v1, v1_port = ports.mock_engine(tmp_path, name="v1")
    v2, v2_port = ports.mock_engine(tmp_path, name="v2")
    procs = [v1, v2]
    bases: dict[str, str] = {}
    config = tmp_path / "weir.toml"
    try:
        for name in ("a", "b"):
            log = tmp_path / f"gateway-{name}.log"

            def gateway(port: int, log: Path = log) -> subprocess.Popen[bytes]:
                path = tmp_path / f"weir-{port}.toml"
                path.write_text(weir_toml(
                    gateway={"port": port}, keys={"admin_key": ADMIN},
                    deploy={"redis_url": redis.url, "warm_requests": 1},
                    models=[{"name": "smollm2", "task": "chat", "current": "v1", "versions": [
                        {"version": "v1", "url": f"http://127.0.0.1:{v1_port}"},
                        {"version": "v2", "url": f"http://127.0.0.1:{v2_port}", "standby": True},
                    ]}],
                ))  # fmt: skip
                config.write_text(path.read_text())
                return start([weir_command(), "--config", str(path), "serve"], log)

            def log_of(_: int, log: Path = log) -> Path:
                return log

            proc, port = ports.listening_process(gateway, log_of)
            procs.append(proc)
            bases[name] = f"http://127.0.0.1:{port}"
            wait_for(f"{bases[name]}/readyz", 60)

        async def scenario() -> tuple[list[Sample], float, float]:
            samples: list[Sample] = []
            stop = asyncio.Event()
            loader = asyncio.create_task(load(bases, stop, samples))
            await asyncio.sleep(1.0)
            t_deploy = time.monotonic()
            done = await asyncio.to_thread(admin, ["deploy", "smollm2", "v2"], config, bases["a"])
            assert done.returncode == 0, done.stdout + done.stderr
            await asyncio.sleep(1.5)
            t_back = time.monotonic()
            back = await asyncio.to_thread(admin, ["rollback", "smollm2"], config, bases["b"])
            assert back.returncode == 0, back.stdout + back.stderr
            await asyncio.sleep(1.5)
            stop.set()
            await loader
            return samples, t_deploy, t_back

        samples, t_deploy, t_back = asyncio.run(scenario())
    finally:
        stop_all(procs)
        redis.stop()
    failed = [s for s in samples if s[2] != 200]
    assert not failed, failed[:5]
    assert {s[3] for s in samples} == {"v1", "v2"}
    before_back = [s for s in samples if s[1] < t_back]
    deployed = {g: switch_at(before_back, g, "v2", t_deploy) for g in bases}
    rolled = {g: switch_at([s for s in samples if s[1] >= t_back], g, "v1", t_back) for g in bases}
    print(f"\nrequests {len(samples)}, failed 0; deploy switch a-b "
          f"{abs(deployed['a'] - deployed['b']) * 1000:.0f} ms; rollback switch a-b "
          f"{abs(rolled['a'] - rolled['b']) * 1000:.0f} ms")  # fmt: skip
    assert abs(deployed["a"] - deployed["b"]) < 1.0
    assert abs(rolled["a"] - rolled["b"]) < 1.0
