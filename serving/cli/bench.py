"""``weir bench run|compare ...``: the black-box benchmark suite in ``bench/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def bench(args: argparse.Namespace) -> int:
    import subprocess

    module = {"run": "bench.run", "compare": "bench.compare"}[args.bench_command]
    return subprocess.call([sys.executable, "-m", module, *args.rest])


def add_commands(commands: Any) -> None:
    bench_cmd = commands.add_parser(
        "bench", help="Locust benchmarks: run a scenario, compare two runs (--help for each)"
    )
    bench_cmd.add_argument("bench_command", choices=["run", "compare"])
    bench_cmd.add_argument("rest", nargs=argparse.REMAINDER)
    bench_cmd.set_defaults(func=bench)
