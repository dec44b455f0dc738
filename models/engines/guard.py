"""A small guard that owns one engine process group, so no engine outlives the gateway.

Run as ``python -m models.engines.guard --grace S -- CMD ...``. It ignores SIGINT (a Ctrl-C
meant for the gateway reaches its whole process group) and starts CMD in a new
session (its own process group, which vLLM's worker processes join), then waits for
whichever comes first:

- CMD exits: the rest of its group is killed and the guard exits with CMD's status;
- SIGTERM, or EOF on stdin (the gateway holds the other end of that pipe, so
  EOF means the gateway died, even by SIGKILL): the group gets SIGTERM, then SIGKILL
  after the grace period.

With ``--pidfile`` it records the group's id, so that the supervisor can still kill the
group if the guard itself is killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _watch_stdin(stop: threading.Event) -> None:
    try:  # os.read, not sys.stdin: a buffered read holds a lock that aborts interpreter exit
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.set()


def stop_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    pgid = child.pid
    _kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _kill_group(pgid, signal.SIGKILL)
    child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.engines.guard")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--pidfile", default=None, help="write the engine's pid (= its pgid) here")
    parser.add_argument(
        "--cpus", default="", help="comma-separated cores the engine runs on (it inherits them)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no engine command given")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    # Ctrl-C reaches the whole foreground group; the gateway stops engines in its own order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    child = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
    print(f"engine_guard: engine pid {child.pid}", flush=True)
    if args.pidfile:
        with open(args.pidfile, "w") as handle:
            handle.write(str(child.pid))
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()

    while not stop.is_set():
        code = child.poll()
        if code is not None:
            _kill_group(child.pid, signal.SIGKILL)  # workers left behind by a dead server
            print(f"engine_guard: engine exited with {code}", flush=True)
            return code if code >= 0 else 128 - code
        stop.wait(0.2)
    print("engine_guard: stopping engine", flush=True)
    stop_group(child, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
