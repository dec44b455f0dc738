"""What a pause costs the next request: the same work, hot and after the core sat idle.

    python -m bench.idle_penalty [--cpu 1] [--repeats 300]

At concurrency 1 a gateway sits idle between a request's events (a stream paced by its
engine waits ~10 ms per token), and on a virtual machine the first work after an idle
stretch can run many times slower than the same work hot (caches and branch predictors
cold, the vCPU woken). That work is the gateway's relay of the next event, or its whole
path for the next request: part of why ``bench.overhead``'s added TTFT (each token after
a 10 ms pause) is above its added latency for back-to-back requests (with the engine
pacing 1 ms instead of 10 the added TTFT fell from 0.93 to 0.81 ms on this project's
2-core VM). nginx's per-request work is a few microseconds and barely shows it.

The work here is the gateway's own validation of one chat request (pydantic, from bytes),
timed once after each pause; every pause is timed ``--repeats`` times, pinned to one core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import orjson
from rich.console import Console
from rich.table import Table

from serving.protocol.requests import ChatCompletionRequest

PAUSES_MS = (0.0, 0.2, 1.0, 2.0, 5.0, 10.0, 50.0)
BODY = orjson.dumps({
    "model": "smollm2", "max_tokens": 16, "stream": True,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
})  # fmt: skip


def timed_after(pause_s: float, repeats: int) -> float:
    """The median time of one validation, each after ``pause_s`` of sleep (µs)."""
    samples = []
    for _ in range(repeats):
        if pause_s:
            time.sleep(pause_s)
        started = time.perf_counter_ns()
        ChatCompletionRequest.model_validate_json(BODY)
        samples.append((time.perf_counter_ns() - started) / 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    for _ in range(2000):
        ChatCompletionRequest.model_validate_json(BODY)  # warm: imports, caches
    rows = [(pause, timed_after(pause / 1e3, args.repeats)) for pause in PAUSES_MS]
    hot = rows[0][1]
    table = Table(title="One chat request's validation after a pause (median µs)")
    for column in ("pause before it", "µs", "x hot"):
        table.add_column(column, justify="right")
    for pause, micros in rows:
        table.add_row(f"{pause:g} ms" if pause else "none (hot)", f"{micros:.1f}",
                      f"{micros / hot:.1f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
