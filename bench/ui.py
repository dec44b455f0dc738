"""Locust's web UI on the suite, with a "TTFT / ITL" tab per variant (``bench.web_tab``).

    weir bench ui --host http://127.0.0.1:8000 [--scenario stream-chat] [--web-port 8089] \\
        [--versions v1,v2] [--compare-host URL] [-- any other locust option]

Start, stop and reshape the load from the browser; the raw samples go to ``--out`` as in
``weir bench run`` (``python -m bench.report OUT/samples.jsonl`` makes the report).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench.run import LOCUST, SCENARIOS


def command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [*LOCUST, "--host", args.host, "--web-host", args.web_host]
    cmd += ["--web-port", str(args.web_port), "--weir-model", args.model]
    cmd += ["--weir-samples", str(args.out / "samples.jsonl"), "--weir-mix", args.mix]
    if args.versions:
        cmd += ["--weir-versions", args.versions]
    if args.compare_host:
        cmd += ["--weir-compare-host", args.compare_host]
    return cmd + extra + SCENARIOS[args.scenario]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="stream-chat")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--versions", default="")
    parser.add_argument("--compare-host", default="")
    parser.add_argument("--mix", default="fixed")
    parser.add_argument("--web-host", default="127.0.0.1")
    parser.add_argument("--web-port", type=int, default=8089)
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results") / f"ui-{time.strftime('%H%M%S')}"
    )
    args, extra = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Locust web UI on http://{args.web_host}:{args.web_port} (tab: TTFT / ITL)")
    raise SystemExit(subprocess.call(command(args, [e for e in extra if e != "--"])))


if __name__ == "__main__":
    main()
