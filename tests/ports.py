"""Servers the tests start on a free port, without the race of a port found free.

A port found free (bound to 0, read, closed) may be taken by someone else before the
server binds it: another test's server, or any connection's ephemeral source port. A
server started here is retried on a new port when it reports that the port was in use,
and counts as up only once the process we started (or one under it) listens there: a
server that lost the race must never be mistaken for the one that holds the port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

from bench.procs import start, start_gateway

T = TypeVar("T")
ATTEMPTS = 5
BIND_FAILURES = ("address already in use", "errno 98")


class PortTaken(Exception):
    """The server could not bind the port it was given: another process holds it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid``, or a process under it, listens on TCP ``port``."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in family:
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            return True
    return False


def bind_failed(output: str) -> bool:
    lowered = output.lower()
    return any(marker in lowered for marker in BIND_FAILURES)


def on_free_port(
    start: Callable[[int], T], *, pick: Callable[[], int] = free_port, attempts: int = ATTEMPTS
) -> T:
    """``start(port)`` on a port from ``pick``, again on a new one each time it raises
    ``PortTaken``; ``pick`` is for tests of this retry (a port they hold on purpose)."""
    taken = []
    for _ in range(attempts):
        port = pick()
        try:
            return start(port)
        except PortTaken:
            taken.append(port)
    raise RuntimeError(f"no free port after {attempts} tries: {taken} were taken")


def wait_listening(
    process: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 60.0
) -> None:
    """Until ``process`` (or its child) listens on ``port``. ``PortTaken`` when it exited
    saying the port was in use; ``RuntimeError`` when it exited otherwise or never bound."""
    deadline = time.monotonic() + timeout_s
    while not listens(process.pid, port):
        if process.poll() is not None:
            output = log.read_text(errors="replace") if log.exists() else ""
            if bind_failed(output):
                raise PortTaken(port)
            tail = "\n".join(output.splitlines()[-20:])
            raise RuntimeError(f"exited with {process.returncode} before listening:\n{tail}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"not listening on {port} within {timeout_s}s (see {log})")
        time.sleep(0.05)


def listening_process(
    start: Callable[[int], subprocess.Popen[bytes]],
    log: Callable[[int], Path],
    *,
    timeout_s: float = 60.0,
    pick: Callable[[], int] = free_port,
) -> tuple[subprocess.Popen[bytes], int]:
    """``start(port)`` (a process whose output goes to ``log(port)``), retried on a new
    port until one is bound by it; the process and its port."""

    def attempt(port: int) -> tuple[subprocess.Popen[bytes], int]:
        process = start(port)
        wait_listening(process, port, log(port), timeout_s)
        return process, port

    return on_free_port(attempt, pick=pick)


def taken_first(holder: socket.socket) -> Callable[[], int]:
    """A ``pick`` whose first port is the one ``holder`` is bound to, then free ones."""
    ports: Iterator[int] = iter([int(holder.getsockname()[1])])
    return lambda: next(ports, None) or free_port()


def gateway(
    config: Callable[[int], str],
    work: Path,
    name: str,
    *,
    timeout_s: float = 120.0,
    pick: Callable[[], int] = free_port,
    **options: Any,
) -> tuple[subprocess.Popen[bytes], str]:
    """``weir serve`` (``bench.procs.start_gateway``) with the weir.toml ``config(port)``,
    listening on a port of its own; the process and its base URL (not yet ready: wait
    for /readyz)."""
    process, port = listening_process(
        lambda port: start_gateway(config(port), work, name, **options),
        lambda _: work / f"{name}.log",
        timeout_s=timeout_s,
        pick=pick,
    )
    return process, f"http://127.0.0.1:{port}"


def mock_engine(
    work: Path, *args: str, name: str = "mock", pick: Callable[[], int] = free_port
) -> tuple[subprocess.Popen[bytes], int]:
    """``bench.mock_engine`` with ``args``, listening on a port of its own."""
    return listening_process(
        lambda port: start(
            [sys.executable, "-m", "bench.mock_engine", "--port", str(port), *args],
            work / f"{name}.log",
        ),
        lambda _: work / f"{name}.log",
        pick=pick,
    )
