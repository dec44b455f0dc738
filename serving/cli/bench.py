"""``weir bench run|sweep|compare|report|ui ...``: the black-box load-test suite in ``bench/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

MODULES = {
    "run": "bench.run",
    "sweep": "bench.sweep",
    "compare": "bench.compare",
    "report": "bench.report",
    "ui": "bench.ui",
}


def bench(args: argparse.Namespace) -> int:
    import subprocess

    return subprocess.call([sys.executable, "-m", MODULES[args.bench_command], *args.rest])


def add_commands(commands: Any) -> None:
    bench_cmd = commands.add_parser(
        "bench",
        help="Locust load tests: run a scenario (--processes N, --master/--worker), sweep "
        "rates against an SLO, compare two runs, remake a report, Locust's web UI "
        "(--help for each)",
    )
    bench_cmd.add_argument("bench_command", choices=sorted(MODULES))
    bench_cmd.add_argument("rest", nargs=argparse.REMAINDER)
    bench_cmd.set_defaults(func=bench)
