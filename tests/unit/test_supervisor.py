"""Engine processes: restarted when killed, gone when stopped, gone when we die."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest

from models.config import EngineConfig
from models.engines import vllm_engine
from models.engines.backoff import ExponentialBackoff
from models.engines.client import EngineTimeouts, HttpEngine
from models.engines.fleet import Fleet, Replica
from models.engines.launcher import free_port
from models.engines.placement import Placement
from models.engines.supervisor import STABLE_AFTER_S, EngineProcess
from models.types import ReplicaKey
from tests import ports
from tests.windows import Clock

pytestmark = pytest.mark.anyio
FAKE_SERVER = Path(__file__).resolve().parents[1] / "fakes" / "engine_server.py"


def engine_command(port: int) -> list[str]:
    return [sys.executable, str(FAKE_SERVER), "--port", str(port), "--child"]


def group_pids(guard_pid: int) -> list[int]:
    """The guard and everything under it: the engine and its worker."""
    guard = psutil.Process(guard_pid)
    return [guard_pid] + [p.pid for p in guard.children(recursive=True)]


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


async def await_gone(pids: list[int], timeout_s: float) -> list[int]:
    """As ``wait_gone``, without blocking the event loop the supervisor runs on."""
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:  # noqa: ASYNC110 (polling other processes)
        await asyncio.sleep(0.05)
    return alive(pids)


async def wait_healthy(fleet: Fleet, timeout_s: float = 20.0) -> None:
    assert await fleet.wait_ready(timeout_s), fleet.readiness()


async def wait_restarted(process: EngineProcess, times: int, exact: bool = True) -> None:
    """Until ``process`` was restarted ``times`` times (``exact``: and no more)."""
    deadline = time.monotonic() + 20
    while process.restarts < times and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert process.restarts == times if exact else process.restarts >= times


async def wait_logged(process: EngineProcess, text: str, timeout_s: float = 20.0) -> None:
    """Until ``text`` is in the process's log (polling another process's output)."""
    deadline = time.monotonic() + timeout_s
    while text not in process.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never logged"
        await asyncio.sleep(0.02)


def make_fleet(tmp_path: Path) -> tuple[Fleet, EngineProcess]:
    port = free_port()
    process = EngineProcess(
        "fake@v1#0",
        engine_command(port),
        env=None,
        log_path=tmp_path / "engine.log",
        grace_s=2.0,
        backoff=ExponentialBackoff(base=0.1, cap=0.5),
    )
    engine = HttpEngine("fake", f"http://127.0.0.1:{port}", EngineTimeouts(health_s=0.5))
    replica = Replica(ReplicaKey("fake", "v1", 0), engine, "fake", process)
    return Fleet([replica], health_interval_s=0.1), process


async def started_on_its_port(fleet: Fleet, process: EngineProcess) -> bool:
    """Start ``fleet``: True once its engine listens on its port; False (and stopped) when
    the engine said the port was taken, so that healthy can only mean our engine."""
    port = int(process.command[process.command.index("--port") + 1])
    await fleet.start()
    deadline = time.monotonic() + 20
    while not ports.listens(process.pid or 0, port):
        if ports.bind_failed(process.log_path.read_text(errors="replace")):
            await fleet.stop()
            return False
        if time.monotonic() > deadline:
            await fleet.stop()
            raise AssertionError(f"the fake engine never listened on {port}")
        await asyncio.sleep(0.05)
    return True


@asynccontextmanager
async def running_fleet(tmp_path: Path) -> AsyncIterator[tuple[Fleet, EngineProcess]]:
    """A one-replica fleet of the fake engine, healthy on entry, stopped on exit; made
    again on a new port when another process took its port first (``tests.ports``)."""
    for attempt in range(ports.ATTEMPTS):
        fleet, process = make_fleet(tmp_path / f"try-{attempt}")
        if await started_on_its_port(fleet, process):
            break
    else:
        raise RuntimeError(f"the fake engine found no free port in {ports.ATTEMPTS} tries")
    try:
        await wait_healthy(fleet)
        yield fleet, process
    finally:
        await fleet.stop()


async def test_killed_engine_comes_back_and_stop_leaves_nothing(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as (fleet, process):
        first = group_pids(process.pid or 0)
        assert len(first) == 3  # guard, engine, engine's worker
        os.kill(first[1], signal.SIGKILL)  # the engine itself dies
        assert await await_gone(first, 5.0) == []  # the guard cleans up its group and exits
        await wait_restarted(process, 1)
        await wait_healthy(fleet)
        second = group_pids(process.pid or 0)
        assert set(second).isdisjoint(first)
    assert await await_gone(second, 5.0) == []  # stopped: nothing left
    assert not fleet.ready()


async def test_ctrl_c_to_the_group_is_left_to_the_gateway(tmp_path: Path) -> None:
    """A terminal's SIGINT reaches the guards too; they leave stopping to the gateway."""
    async with running_fleet(tmp_path) as (_, process):
        before = group_pids(process.pid or 0)
        os.kill(before[0], signal.SIGINT)  # the guard
        await asyncio.sleep(1.0)
        assert alive(before) == before
        assert process.restarts == 0


async def test_engine_is_reaped_when_its_guard_is_killed(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as (fleet, process):
        first = group_pids(process.pid or 0)
        os.kill(first[0], signal.SIGKILL)  # the guard dies and cannot clean up
        assert await await_gone(first, 5.0) == []  # the supervisor kills the orphaned group
        await wait_restarted(process, 1)
        await wait_healthy(fleet)  # and the restarted engine could bind the same port


async def test_stop_escalates_to_sigkill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The guard sends SIGKILL after its grace period; the supervisor's own fallback (it
    kills the guard when the guard does not stop within grace + 5 s) is not needed."""
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\ntime.sleep(3600)\n"
    )
    process = EngineProcess(
        "stubborn",
        [sys.executable, str(stubborn)],
        env=None,
        log_path=tmp_path / "stubborn.log",
        grace_s=0.5,
        backoff=ExponentialBackoff(),
    )
    await process.start()
    await wait_logged(process, "ignoring SIGTERM")
    pids = group_pids(process.pid or 0)
    assert len(pids) == 2  # the guard and the stubborn engine
    with caplog.at_level(logging.ERROR, logger="weir.supervisor"):
        await process.stop()
    assert "did not stop" not in caplog.text  # the guard escalated by itself
    assert await await_gone(pids, 2.0) == []
    assert "stopping engine" in (tmp_path / "stubborn.log").read_text()


class RecordedBackoff:
    """The real back-off, and for each delay asked for (just after an exit): the failure
    count, the delay, when it was asked, and when the run that just exited had started."""

    def __init__(self, backoff: ExponentialBackoff) -> None:
        self.backoff = backoff
        self.process: EngineProcess | None = None
        self.asked: list[tuple[int, float, float, float]] = []

    def compute(self, failures: int) -> float:
        delay = self.backoff.compute(failures)
        assert self.process is not None
        self.asked.append((failures, delay, time.monotonic(), self.process.started_at))
        return delay


async def test_crash_loop_backs_off(tmp_path: Path) -> None:
    """Each quick exit counts one more failure, and the next start waits the back-off
    of that count: from an exit to the next start is at least the delay asked for (a
    slow host only makes it longer; nothing here depends on host speed)."""
    backoff = RecordedBackoff(ExponentialBackoff(base=0.05, cap=0.2))
    process = EngineProcess(
        "crashy",
        [sys.executable, "-c", "raise SystemExit(3)"],
        env=None,
        log_path=tmp_path / "crashy.log",
        grace_s=0.5,
        backoff=backoff,
    )
    backoff.process = process
    await process.start()
    try:
        await wait_restarted(process, 5, exact=False)
    finally:
        await process.stop()
    failures = [n for n, _, _, _ in backoff.asked]
    assert failures == list(range(1, len(failures) + 1))  # never reset: none lived 60 s
    assert [d for _, d, _, _ in backoff.asked[:5]] == [0.05, 0.1, 0.2, 0.2, 0.2]
    for (_, delay, exited, _), (_, _, _, started) in itertools.pairwise(backoff.asked):
        assert started - exited >= delay  # started again only once the delay had passed
    assert process.restarts in (len(failures), len(failures) - 1)  # the last may be waiting
    assert "engine exited with 3" in (tmp_path / "crashy.log").read_text()


async def test_a_process_that_lived_long_starts_its_failures_again(tmp_path: Path) -> None:
    """A process that ran STABLE_AFTER_S (60 s, on a clock the test holds) before it
    exited counts as a first failure again: the short back-off, not the capped one."""
    clock = Clock()
    hold = tmp_path / "hold"
    backoff = RecordedBackoff(ExponentialBackoff(base=0.05, cap=0.2))
    script = (
        "import os, sys, time\n"
        f"if os.path.exists({str(hold)!r}):\n"
        "    print('holding', flush=True)\n"
        f"    while os.path.exists({str(hold)!r}): time.sleep(0.02)\n"
        "sys.exit(3)\n"
    )
    process = EngineProcess(
        "steady",
        [sys.executable, "-c", script],
        env=None,
        log_path=tmp_path / "steady.log",
        grace_s=0.5,
        backoff=backoff,
        clock=clock,
    )
    backoff.process = process
    await process.start()
    try:
        await wait_restarted(process, 3, exact=False)  # failures 1, 2, 3: a crash loop
        hold.touch()  # from the next start on, the process runs until hold is removed
        await wait_logged(process, "holding")
        crashes = len(backoff.asked)
        clock.now += STABLE_AFTER_S  # it has run a minute
        hold.unlink()
        deadline = time.monotonic() + 20
        while len(backoff.asked) < crashes + 2:
            assert time.monotonic() < deadline, backoff.asked
            await asyncio.sleep(0.02)
    finally:
        await process.stop()
    failures = [n for n, _, _, _ in backoff.asked]
    assert failures[:crashes] == list(range(1, crashes + 1))
    assert failures[crashes : crashes + 2] == [1, 2]  # counted afresh after the long run


def test_engines_die_with_a_killed_gateway(tmp_path: Path) -> None:
    """SIGKILL the process that owns the engines: the guard still stops them."""
    port = 0  # its engine needs no known port (0: the kernel picks one, nothing to race)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from models.engines.backoff import ExponentialBackoff
        from models.engines.supervisor import EngineProcess

        async def main():
            p = EngineProcess("fake", {engine_command(port)!r}, env=None,
                              log_path=Path({str(tmp_path / "e.log")!r}), grace_s=1.0,
                              backoff=ExponentialBackoff())
            await p.start()
            print(p.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        guard_pid = int(owner.stdout.readline())
        deadline = time.monotonic() + 10
        pids = group_pids(guard_pid)
        while len(pids) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = group_pids(guard_pid)
        assert len(pids) == 3
        owner.kill()
        owner.wait()
        assert wait_gone(pids, 5.0) == []
    finally:
        owner.kill()


def test_backoff_doubles_to_its_cap() -> None:
    backoff = ExponentialBackoff(base=1.0, cap=30.0)
    assert [backoff.compute(n) for n in range(0, 8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    jittered = ExponentialBackoff(base=1.0, cap=30.0, jitter=True)
    assert all(0 <= jittered.compute(5) <= 16 for _ in range(100))


SHOW_CORES = "import os, time; print(sorted(os.sched_getaffinity(0)), flush=True); time.sleep(30)"


async def test_an_engine_pinned_to_cores_runs_only_there(tmp_path: Path) -> None:
    """``cpus`` (a version's cores on a CPU host): the guard and the engine under it are
    pinned, and vLLM is told to bind its OpenMP threads to the same cores."""
    core = max(os.sched_getaffinity(0))
    pinned = Placement(ReplicaKey("pinned", "v1", 0), cpus=(core,), omp=((core,),))
    env = vllm_engine.environment(EngineConfig(), {}, "cpu", pinned)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(core)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_engine.environment(EngineConfig(), {}, "cpu")
    process = EngineProcess(
        "pinned@v1#0",
        [
            sys.executable,
            "-c",
            "import os, time; print(sorted(os.sched_getaffinity(0)), flush=True); time.sleep(30)",
        ],
        env=None,
        log_path=tmp_path / "pinned.log",
        grace_s=1.0,
        backoff=ExponentialBackoff(base=0.1, cap=0.5),
        cpus=[core],
    )
    await process.start()
    try:
        deadline = time.monotonic() + 10
        shown = f"[{core}]"
        while shown not in process.log_path.read_text() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # (polling another process's log)
        assert shown in process.log_path.read_text()
    finally:
        await process.stop()
