"""Starting what a benchmark measures: a mock engine, ``weir serve`` in front of it.

Black-box: ``weir`` runs as a command and is reached over HTTP.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.config_builder import model, weir_toml


def gateway_config(
    port: int, mock_port: int, logs: Path, *, key: str | None = None, tokenizer: str | None = None
) -> str:
    """A weir.toml serving ``smollm2`` from a remote (mock) engine."""
    return weir_toml(
        gateway={"port": port, "api_keys": [key] if key else []},
        engines={"log_dir": logs},
        models=[
            model(
                "smollm2",
                "mock",
                url=f"http://127.0.0.1:{mock_port}",
                engine_args=["--max-model-len", "2048"],
                tokenizer=tokenizer,
            )
        ],
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weir_command() -> str:
    """The ``weir`` next to this interpreter (a venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "weir"
    return str(beside) if beside.exists() else (shutil.which("weir") or "weir")


def wait_for(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} not ready in {timeout_s}s")


def start(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, output to ``log``; ``env`` adds variables;
    ``cpus`` pins it (and what it starts later) to those cores."""
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


def split_cores(spec: str) -> tuple[set[int], set[int]]:
    """``(proxy cores, the rest)`` for a benchmark: ``auto`` gives the proxy under test the
    last core when there are two or more (as a gateway gets its own core in production,
    with the engine on another machine), ``none`` pins nothing, else ``2,3``."""
    cores = sorted(os.sched_getaffinity(0))
    if spec == "none" or (spec == "auto" and len(cores) < 2):
        return set(), set()
    mine = {cores[-1]} if spec == "auto" else {int(c) for c in spec.split(",")}
    rest = set(cores) - mine
    if not rest:
        raise SystemExit(f"--proxy-cpus {spec}: no core left for the client and the mock")
    return mine, rest


def start_gateway(
    config_text: str,
    work: Path,
    name: str,
    env: dict[str, str] | None = None,
    log_level: str = "WARNING",
    cpus: set[int] | None = None,
    weir: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``weir serve`` with ``config_text`` as its weir.toml; logs to ``work/name.log``.
    ``weir`` is the command to run instead of the installed ``weir``."""
    config = work / f"{name}.toml"
    config.write_text(config_text)
    command = [*(weir or [weir_command()]), "--config", str(config), "serve"]
    command += ["--log-level", log_level]
    return start(command, work / f"{name}.log", env, cpus)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C to each group, then wait for all of them."""
    for proc in procs:
        os.killpg(proc.pid, signal.SIGINT)
    for proc in procs:
        proc.wait(30)
