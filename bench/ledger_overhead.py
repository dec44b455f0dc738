"""What the usage ledger costs on the hot path: ``bench.overhead``'s added latency with the
ledger on and off, interleaved in one run, several repetitions.

Starts ``bench.mock_engine`` and two ``weir serve`` in front of it, identical but for
``WEIR_LEDGER__ENABLED`` (true: one row per request to SQLite, the default database;
false: no ledger). Each repetition sends ``--requests`` non-streaming chats at
concurrency 1 to the mock directly and through both gateways, the three interleaved
request by request (``bench.overhead.added_latency``), and reports the p50 and p99
each gateway adds over direct. The difference (on - off) per repetition, and its mean
and spread over repetitions, is the ledger's cost; the spread is the machine's noise.

Black-box: ``weir`` as a command, HTTP only.

    python -m bench.ledger_overhead [--requests 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.overhead import KEY, added_latency, pct
from bench.procs import (
    free_port,
    gateway_config,
    split_cores,
    start,
    start_gateway,
    stop_all,
    wait_for,
)

TARGETS = ("ledger off", "ledger on")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proxy-cpus", default="auto", help="as bench.overhead's")
    parser.add_argument("--out", default="bench-results/ledger_overhead.json")
    args = parser.parse_args()
    proxy_cpus, rest = split_cores(args.proxy_cpus)
    if rest:
        os.sched_setaffinity(0, rest)
    work = Path(tempfile.mkdtemp(prefix="weir-ledger-overhead-"))
    mock = free_port()
    procs = [start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock)],
                   work / "mock.log")]  # fmt: skip
    targets = {"direct": f"http://127.0.0.1:{mock}"}
    for name in TARGETS:
        port = free_port()
        env = {
            "WEIR_LEDGER__ENABLED": "true" if name == "ledger on" else "false",
            "WEIR_LEDGER__PATH": str(work / "ledger.db"),
            "WEIR_LEDGER__SPILL_DIR": str(work / "spill"),
        }
        toml = gateway_config(port, mock, work, key=KEY)
        procs.append(start_gateway(toml, work, name.replace(" ", "-"), env, cpus=proxy_cpus))
        targets[name] = f"http://127.0.0.1:{port}"
    reps: list[dict[str, Any]] = []
    try:
        wait_for(f"{targets['direct']}/health")
        for name in TARGETS:
            wait_for(f"{targets[name]}/readyz", 120)
        for _ in range(args.repeats):
            samples = added_latency(targets, args.requests)
            rep: dict[str, Any] = {}
            for name in TARGETS:
                for q in (50, 99):
                    rep[f"{name} p{q} added"] = pct(samples[name], q) - pct(samples["direct"], q)
            for q in (50, 99):
                rep[f"p{q} on - off"] = rep[f"ledger on p{q} added"] - rep[f"ledger off p{q} added"]
            reps.append(rep)
    finally:
        stop_all(procs)  # the ledger-on gateway writes what it holds as it stops
    rows = ledger_rows(work / "ledger.db")
    result = {"requests": args.requests, "repeats": reps, "summary": summary(reps),
              "ledger_rows": rows, "cores": {"gateways": sorted(proxy_cpus)}}  # fmt: skip
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


def ledger_rows(path: Path) -> int | None:
    """Rows the ledger-on gateway wrote (a check that it did record: 100 warm-up requests
    and ``--requests`` per repetition)."""
    import sqlite3

    if not path.exists():
        return None
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM usage").fetchone()[0])


def summary(reps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in reps[0]:
        values = [r[name] for r in reps]
        out[name] = {
            "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return out


def report(result: dict[str, Any]) -> None:
    names = list(result["repeats"][0])
    print(f"added latency over direct (ms), c=1, {result['requests']} requests per repetition")
    print("rep  " + "  ".join(f"{n:>18}" for n in names))
    for i, rep in enumerate(result["repeats"], 1):
        print(f"{i:3}  " + "  ".join(f"{rep[n]:>+18.3f}" for n in names))
    for n, s in result["summary"].items():
        print(f"{n:>18}: mean {s['mean']:+.3f} ms, stdev {s['stdev']:.3f},"
              f" range {s['min']:+.3f} .. {s['max']:+.3f}")  # fmt: skip
    print(f"rows in the ledger-on gateway's SQLite: {result['ledger_rows']}")


if __name__ == "__main__":
    main()
