"""Crash test for the Batch API: SIGKILL the gateway mid-batch, again and again.

A mock engine (``--slots``, answers take ``--answer-ms``) and ``weir serve`` in front of it
with the batch store in a work directory. A ``--lines``-request batch is started; each
time it has made ``1/(kills+1)`` more progress the gateway's whole process group gets
SIGKILL and is started again on the same store (a new process: it waits out the dead
one's lease, ``--lease-s``). At the end the batch must be ``completed`` and every input
line must have exactly one output line (output file plus error file).

Black-box: ``weir`` as a command, HTTP only. ``run`` is what the integration test calls.

    python -m bench.batch_crash [--lines 2000] [--kills 3] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, wait_for

KEY = "sk-batch-crash"
HEADERS = {"authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
Starter = Callable[[Path, int], tuple[subprocess.Popen[bytes], str]]  # (work, mock port)


def config(port: int, mock: int, work: Path, lease_s: float, database_url: str = "") -> str:
    """The gateway's configuration: the batch store in the work directory's SQLite file,
    or in the PostgreSQL database at ``database_url``."""
    store = {"database_url": database_url} if database_url else {
        "sqlite_path": str(work / "batches.sqlite3")}  # fmt: skip
    return weir_toml(
        gateway={"port": port, "api_keys": [KEY]},
        engines={"log_dir": work},
        batches={**store, "lease_s": lease_s, "poll_s": 0.2, "concurrency": 32},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}")],
    )  # fmt: skip


def input_file(lines: int) -> bytes:
    rows = [{"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": {
        "model": "smollm2", "messages": [{"role": "user", "content": f"item {i}"}]}}
        for i in range(lines)]  # fmt: skip
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def state(base: str, batch_id: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{base}/v1/batches/{batch_id}", headers=HEADERS).json()
    return found


def done_lines(found: dict[str, Any]) -> int:
    counts = found["request_counts"]
    return int(counts["completed"]) + int(counts["failed"])


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def run(work: Path, lines: int, kills: int, mock: int, starter: Starter) -> dict[str, Any]:
    """The crash test against the mock on port ``mock``; ``starter`` starts a gateway."""
    gateway, base = starter(work, mock)
    wait_for(f"{base}/readyz", 60)
    uploaded = httpx.post(f"{base}/v1/files", headers=HEADERS, data={"purpose": "batch"},
                          files={"file": ("in.jsonl", input_file(lines))}).json()  # fmt: skip
    batch = httpx.post(
        f"{base}/v1/batches",
        headers=HEADERS,
        json={"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"},
    ).json()
    started = time.monotonic()
    killed_at: list[int] = []
    try:
        for n in range(1, kills + 1):
            target = lines * n // (kills + 1)
            while done_lines(state(base, batch["id"])) < target:
                time.sleep(0.05)
            kill(gateway)
            killed_at.append(target)
            gateway, base = starter(work, mock)
            wait_for(f"{base}/readyz", 60)
        deadline = time.monotonic() + 600
        while (found := state(base, batch["id"]))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
        outputs = []
        for key in ("output_file_id", "error_file_id"):
            if found.get(key):
                content = httpx.get(f"{base}/v1/files/{found[key]}/content", headers=HEADERS)
                outputs += [json.loads(x)["custom_id"] for x in content.content.splitlines()]
    finally:
        kill(gateway)
    seen = Counter(outputs)
    return {
        "status": found["status"], "lines": lines, "kills": len(killed_at),
        "killed_after_lines": killed_at, "output_lines": len(outputs),
        "distinct": len(seen), "duplicates": sum(c - 1 for c in seen.values() if c > 1),
        "missing": lines - len(set(seen) & {f"line-{i}" for i in range(lines)}),
        "request_counts": found["request_counts"],
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--answer-ms", type=float, default=50.0)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--database-url", default="", help="the batch store in PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="weir-crash-") as tmp:
        work = Path(tmp)
        mock = free_port()
        engine = start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock),
                        "--slots", str(args.slots), "--delay-ms", str(args.answer_ms)],
                       work / "mock.log")  # fmt: skip
        wait_for(f"http://127.0.0.1:{mock}/health")

        def starter(work: Path, mock: int) -> tuple[subprocess.Popen[bytes], str]:
            port = free_port()
            text = config(port, mock, work, args.lease_s, args.database_url)
            return start_gateway(text, work, f"gateway-{port}"), f"http://127.0.0.1:{port}"

        try:
            result = run(work, args.lines, args.kills, mock, starter)
        finally:
            engine.kill()
            engine.wait(10)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
