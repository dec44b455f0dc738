"""``weir serve --workers 2``: two gateway processes on one port, metrics still exact."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import httpx

from bench.config_builder import model, weir_toml
from bench.procs import start, stop_all, wait_for, weir_command
from tests import ports
from tests.unit.test_observe import sample


def weir_config(port: int, mock: int) -> str:
    return weir_toml(
        gateway={"port": port}, models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}")]
    )


REQUESTS = 120
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


async def burst(base: str) -> list[int]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
        answers = await asyncio.gather(
            *(client.post(f"{base}/v1/chat/completions", json=BODY) for _ in range(REQUESTS))
        )
    return [a.status_code for a in answers]


def test_two_workers_count_every_request_once(tmp_path: Path) -> None:
    engine, mock = ports.mock_engine(tmp_path)
    procs = [engine]
    config = tmp_path / "weir.toml"

    def workers(port: int) -> subprocess.Popen[bytes]:
        config.write_text(weir_config(port, mock))
        command = [weir_command(), "--config", str(config), "serve", "--workers", "2"]
        return start(command, tmp_path / "gateway.log")

    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        gateway, port = ports.listening_process(workers, lambda _: tmp_path / "gateway.log")
        procs.append(gateway)
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", 60)
        assert asyncio.run(burst(base)) == [200] * REQUESTS
        scrapes = [httpx.get(f"{base}/metrics").text for _ in range(6)]
    finally:
        stop_all(procs)
    log = (tmp_path / "gateway.log").read_text()
    assert log.count("Started server process") == 2, log
    made = re.search(r"\(metrics: (\S+)\)", log)
    assert made is not None, log
    assert not Path(made.group(1)).exists()  # the temporary directory it made is gone
    version = {"model": "smollm2", "model_version": "mock"}
    for text in scrapes:  # whichever worker answers, it reports both
        assert sample(text, "weir_requests_total", **version, status="200") == REQUESTS
        assert sample(text, "tokens_used_total", **version, type="completion") == 3 * REQUESTS
