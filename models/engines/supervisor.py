"""Keeps one local engine process alive: start, restart with back-off, stop cleanly.

Each engine runs under ``models.engines.guard``, which owns the engine's process group:
stopping sends SIGTERM to the whole group and SIGKILL after a grace period, and the
guard kills the group by itself if this process dies (its stdin pipe closes), so no
engine is left orphaned even when the gateway is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from models.engines.backoff import Backoff

log = logging.getLogger("weir.supervisor")
Sleep = Callable[[float], Awaitable[None]]
STABLE_AFTER_S = 60.0  # a process that lived this long resets the failure count


class EngineProcess:
    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None,
        log_path: Path,
        grace_s: float,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
        cpus: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.cpus = tuple(cpus)  # pinned to these cores (CPU hosts); empty: anywhere
        self.command = command
        self.env = env
        self.log_path = log_path
        self.grace_s = grace_s
        self.backoff = backoff
        self.clock = clock
        self.restarts = 0
        self.started_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.pidfile = log_path.with_suffix(".pid")

    def __repr__(self) -> str:
        return f"EngineProcess(name={self.name!r}, pid={self.pid}, restarts={self.restarts})"

    @property
    def pid(self) -> int | None:
        """The guard's pid (the engine is the guard's child)."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def exited(self) -> bool:
        """Started, and its process has ended (the keeper may be about to restart it)."""
        return self._proc is not None and self._proc.returncode is not None

    async def start(self) -> None:
        if self._keeper is None:
            proc = await self._spawn()
            self._proc = proc
            self._keeper = asyncio.create_task(self._keep(proc), name=f"keep {self.name}")

    async def restart(self) -> None:
        """Stop the current process; the keeper starts a new one after its back-off."""
        if self._proc and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.grace_s + 5.0)
            except TimeoutError:
                log.error("engine %s guard did not stop; killing it", self.name)
                proc.kill()
                await proc.wait()
        self._reap_group()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper

    def _reap_group(self) -> None:
        """Kill whatever is left of the engine's group: the guard may have died by SIGKILL."""
        try:
            pgid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            log.warning("engine %s: killed processes its guard left behind", self.name)
        self.pidfile.unlink(missing_ok=True)

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)  # never act on a stale one
        guard = [sys.executable, "-m", "models.engines.guard", "--grace", str(self.grace_s)]
        guard += ["--pidfile", str(self.pidfile)]
        if self.cpus:
            guard += ["--cpus", ",".join(str(c) for c in sorted(self.cpus))]
        guard += ["--"]
        with self.log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *guard,
                *self.command,
                stdin=subprocess.PIPE,  # never written: its EOF tells the guard we died
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.started_at = self.clock()
        log.info("engine %s started (guard pid %d), log %s", self.name, proc.pid, self.log_path)
        return proc

    async def _keep(self, proc: asyncio.subprocess.Process) -> None:
        failures = 0
        while True:
            code = await proc.wait()
            self._reap_group()
            if self._stopping.is_set():
                return
            lived = self.clock() - self.started_at
            failures = 1 if lived >= STABLE_AFTER_S else failures + 1
            delay = self.backoff.compute(failures)
            log.warning(
                "engine %s exited with %s after %.1fs; restart %d in %.1fs (see %s)",
                self.name,
                code,
                lived,
                self.restarts + 1,
                delay,
                self.log_path,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            self.restarts += 1
            proc = await self._spawn()
            self._proc = proc
