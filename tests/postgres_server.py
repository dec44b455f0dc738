"""A real PostgreSQL on a free loopback port, for tests (Debian's ``postgresql`` package).

``PostgresServer(workdir)`` initdb's a cluster in a temporary directory, starts
``postgres`` on a free loopback port (another one when the port was taken before it
could bind it: ``tests.ports``), waits until it accepts connections and creates the
database of its ``url`` (``postgresql://weir@127.0.0.1:PORT/weir``, trust auth on
loopback only). ``kill()`` is a crash (SIGKILL to the postmaster and every backend),
``restart()`` a new server on the same port and data (crash recovery runs), ``stop()``
a clean shutdown, ``remove()`` deletes the cluster.

PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user
(Debian's package creates it; ``.ci/run`` too when it is absent) and every PostgreSQL
process runs as that user; the cluster lives in its own directory under the system's
temp dir because pytest's are private to root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests import ports

__all__ = ["PostgresServer", "postgres_binary"]

USER = "weir"
DATABASE = "weir"
RUN_AS = "postgres"  # the OS user when the tests run as root


def postgres_binary(name: str) -> str:
    """``name`` (postgres, initdb) from PATH, else from Debian's versioned directories
    (/usr/lib/postgresql/N/bin, the highest N), which are not on PATH."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        raise RuntimeError(
            f"{name} is not installed (.ci/run installs Debian's postgresql with apt-get)"
        )

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return 0.0

    return max(candidates, key=version)


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user; none when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        raise RuntimeError(
            f"running as root and there is no {RUN_AS!r} user for PostgreSQL to run as "
            "(.ci/run creates it)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class PostgresServer:
    """Without a ``port`` it takes a free one (retried when taken; ``pick`` chooses the
    ports tried); with ``port`` and ``datadir`` it is a restart of an existing cluster."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        datadir: Path | None = None,
        pick: Callable[[], int] = ports.free_port,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.binary = postgres_binary("postgres")
        self.workdir = workdir
        self._as = _run_as()
        if datadir is None:
            datadir = self._initdb()
        self.datadir = datadir
        if port is None:
            self.process, self.port = ports.listening_process(
                self._spawn, self._log, timeout_s=ready_timeout_s, pick=pick
            )
        else:  # a restart: this port or nothing (its clients know no other)
            self.port = port
            self.process = self._spawn(port)
            try:
                ports.wait_listening(self.process, port, self._log(port), ready_timeout_s)
            except ports.PortTaken:
                raise RuntimeError(f"postgres: port {port} was taken") from None
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"
        self._wait_ready(ready_timeout_s)
        self._create_database()

    def _initdb(self) -> Path:
        # pytest's temp dirs are private to root: the cluster's own directory in /tmp,
        # owned (0700) by the user PostgreSQL runs as.
        parent = Path(tempfile.mkdtemp(prefix="weir-pg-"))
        datadir = parent / "data"
        if self._as:
            os.chown(parent, self._as["user"], self._as["group"])
        log = self.workdir / "initdb.log"
        with log.open("ab") as out:
            done = subprocess.run(
                [postgres_binary("initdb"), "-D", str(datadir), "--username", USER,
                 "--auth", "trust", "--encoding", "UTF8", "--no-locale", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, cwd=parent, check=False, **self._as,
            )  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{tail}")
        return datadir

    def _log(self, port: int) -> Path:
        return self.workdir / f"postgres-{port}.log"

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        with self._log(port).open("ab") as log:
            return subprocess.Popen(
                [self.binary, "-D", str(self.datadir), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.datadir}",
                 "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.datadir.parent,
                start_new_session=True,  # its own process group: kill() takes every backend
                **self._as,
            )  # fmt: skip

    def _wait_ready(self, timeout_s: float) -> None:
        """Until a connection is accepted (a listening server may still be starting up
        or recovering: it refuses connections until then)."""
        deadline = time.monotonic() + timeout_s
        admin = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        while True:
            try:
                with psycopg.connect(admin, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"postgres exited with {self.process.returncode}: {error}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready within {timeout_s}s: {error}") from None
                time.sleep(0.05)

    def _create_database(self) -> None:
        admin = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and every backend, no shutdown checkpoint."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._wait_group_gone()

    def _wait_group_gone(self, timeout_s: float = 10.0) -> None:
        """Until no process of the server's group is left (a restart on the same data
        refuses while an old backend still holds the shared memory)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def restart(self) -> PostgresServer:
        """A new server on the same port and cluster (after ``kill()`` or ``stop()``)."""
        return PostgresServer(self.workdir, port=self.port, datadir=self.datadir)

    def stop(self) -> None:
        """A fast shutdown (SIGINT: open sessions are ended, a checkpoint is written)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._wait_group_gone()

    def remove(self) -> None:
        """Delete the cluster (the server must be stopped)."""
        shutil.rmtree(self.datadir.parent, ignore_errors=True)
