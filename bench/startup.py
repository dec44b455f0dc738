"""Time from a serve command to ready, and the memory of the running stack.

Runs the command (default: ``make serve``) in its own process group, polls ``/readyz``,
then sums the memory of every process in the tree: PSS (shared pages split fairly
between processes) and RSS (what ``top`` shows; counts shared pages once per process).
Stops the stack with SIGINT, as Ctrl-C would. Black-box: imports nothing of Weir's.

    python -m bench.startup --port 8000 -- make serve
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psutil
from rich.console import Console
from rich.table import Table


def tree_memory(root: int) -> tuple[int, float, float]:
    processes = [psutil.Process(root)]
    processes += processes[0].children(recursive=True)
    pss = rss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        pss += info.pss
        rss += info.rss
    return len(processes), pss / 2**30, rss / 2**30


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--settle", type=float, default=5, help="seconds after ready before measuring"
    )
    parser.add_argument("command", nargs="*", default=["make", "serve"])
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = dict(os.environ, PORT=str(args.port))
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}/readyz"
    try:
        while not ready(url):
            if proc.poll() is not None:
                raise SystemExit(f"{command} exited with {proc.returncode} before ready")
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"not ready after {args.timeout}s")
            time.sleep(0.25)
        to_ready = time.monotonic() - started
        time.sleep(args.settle)
        count, pss, rss = tree_memory(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    table = Table(title=" ".join(command))
    for column in ("to ready (s)", "processes", "PSS (GiB)", "RSS sum (GiB)"):
        table.add_column(column, justify="right")
    table.add_row(f"{to_ready:.1f}", str(count), f"{pss:.2f}", f"{rss:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
