"""A real ``redis-server`` on a free loopback port, for tests (Debian's package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import ports
from tests.ports import free_port

__all__ = ["RedisServer", "dead_port", "free_port"]


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
    restarted server (same ``port``, same ``workdir``) comes back with its data.

    Without a ``port`` it takes a free one, and another when redis-server says the port
    was taken before it could bind it (``tests.ports``); ``pick`` chooses the ports tried.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        durable: bool = False,
        pick: Callable[[], int] = ports.free_port,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it with apt-get)")
        self.binary = binary
        self.workdir = workdir
        self.durable = durable
        if port is None:
            self.process, self.port = ports.listening_process(self._spawn, self._log, pick=pick)
        else:  # a restart: this port or nothing (its clients know no other)
            self.port = port
            self.process = self._spawn(port)
            try:
                ports.wait_listening(self.process, port, self._log(port), timeout_s=10)
            except ports.PortTaken:
                raise RuntimeError(f"redis-server: port {port} was taken") from None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"PING\r\n")
            answer = conn.recv(16)
        if not answer.startswith(b"+PONG"):
            self.stop()
            raise RuntimeError(f"redis-server on {self.port} answered {answer!r} to PING")

    def _log(self, port: int) -> Path:
        return self.workdir / f"redis-{port}.log"

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.durable
            else ["--appendonly", "no"]
        )
        with self._log(port).open("ab") as log:
            return subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", str(self.workdir), "--maxmemory-policy", "noeviction"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

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
