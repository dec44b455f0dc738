"""``weir serve --workers 2`` with local engines (issue 26): one supervisor starts them
(``weir engines``, the fake engine in vLLM's place), both workers use the same engine,
and Ctrl-C stops every engine and exits 130, as without workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import httpx
import psutil

from bench.config_builder import model, weir_toml
from bench.procs import start, stop_all, wait_for, weir_command
from tests import ports
from tests.unit.test_observe import sample

REQUESTS = 60
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def burst(base: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
        return await asyncio.gather(
            *(client.post(f"{base}/v1/chat/completions", json=BODY) for _ in range(REQUESTS))
        )


def engines_of(root: psutil.Process) -> list[psutil.Process]:
    return [
        p
        for p in root.children(recursive=True)
        if p.cmdline()[1:3] == ["-m", "tests.fakes.engine_server"]
    ]  # fmt: skip (not their guards, whose command lines hold theirs)


def test_two_workers_share_one_supervisors_engines(tmp_path: Path) -> None:
    config = tmp_path / "weir.toml"
    log = tmp_path / "gateway.log"
    env = {"WEIR_ENGINES__SERVER": "tests.fakes.engine_server",
           "WEIR_ENGINES__LOG_DIR": str(tmp_path / "engines")}  # fmt: skip

    def workers(port: int) -> subprocess.Popen[bytes]:
        config.write_text(
            weir_toml(gateway={"port": port},
                      models=[model("smollm2", "v1", weights="smollm2-135m-instruct")])
        )  # fmt: skip
        command = [weir_command(), "--config", str(config), "serve", "--workers", "2"]
        return start(command, log, env=env)

    gateway, port = ports.listening_process(workers, lambda _: log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", 60)
        answers = asyncio.run(burst(base))
        assert [a.status_code for a in answers] == [200] * REQUESTS, answers[0].text
        engines = engines_of(psutil.Process(gateway.pid))
        assert len(engines) == 1  # one engine, started once: not once per worker
        assert {a.json()["id"] for a in answers} == {f"fake-{engines[0].pid}"}
        scrapes = [httpx.get(f"{base}/metrics").text for _ in range(4)]
        for text in scrapes:  # whichever worker answers, it reports both
            counted = sample(text, "weir_requests_total", model="smollm2", model_version="v1",
                             status="200")  # fmt: skip
            assert counted == REQUESTS
        pid = engines[0].pid
    finally:
        stop_all([gateway])  # Ctrl-C
    assert gateway.returncode == 130  # the shell's code for it, as `weir serve` alone
    text = log.read_text()
    assert text.count("Started server process") == 2, text
    assert "engines ready" in text
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert os.environ.get("WEIR_ENGINES__BOARD") is None  # set for the workers only
