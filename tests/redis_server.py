"""A real ``redis-server`` on a free loopback port, for tests (Debian's package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port where nothing answers, for as long as the block runs: it is bound
    and never listened on, so a connection is refused and no other process can take it
    (a port found free and then released may be taken by another test's server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class RedisServer:
    """``durable``: every write is fsynced to an append-only file, so a killed and
    restarted server (same ``port``, same ``workdir``) comes back with its data."""

    def __init__(self, workdir: Path, *, port: int | None = None, durable: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it with apt-get)")
        self.workdir = workdir
        self.durable = durable
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if durable
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(workdir), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> RedisServer:
        return RedisServer(self.workdir, port=self.port, durable=self.durable)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
