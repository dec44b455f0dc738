"""What routing costs per request, in-process: bulkhead, router, breaker, retry budget.

A microbenchmark of the strategy objects the dispatcher runs for every request (the
one benchmark here that imports Weir's own code: these costs are far below what an
HTTP round trip can resolve). Prints nanoseconds per request for each step and all
together, with 2 and 8 replicas, with and without prefix affinity.

    python -m bench.micro_router [--requests 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from rich.console import Console
from rich.table import Table

from models.engines.fleet import Replica
from models.types import ReplicaKey
from serving.routing.breaker import CircuitBreaker
from serving.routing.bulkhead import Bulkhead
from serving.routing.load import ReplicaLoad
from serving.routing.retry_budget import RetryBudget
from serving.routing.router import Candidate, LeastOutstanding, eligible


class _NoEngine:
    async def complete(self, path: str, body: object) -> object:
        raise NotImplementedError


def fleet(n: int) -> list[Candidate]:
    """``n`` healthy replicas, each with its routing state, as the dispatcher pairs them."""
    return [
        (
            Replica(ReplicaKey("m", "v", i), _NoEngine(), "m", healthy=True),  # type: ignore[arg-type]
            ReplicaLoad(CircuitBreaker()),
        )
        for i in range(n)
    ]


async def per_request(replicas: list[Candidate], affinity: str | None, requests: int) -> float:
    bulkhead = Bulkhead("m@v", 1_000_000, 0, 1.0)
    router = LeastOutstanding()
    budget = RetryBudget()
    started = time.perf_counter_ns()
    for _ in range(requests):
        slot = await bulkhead.acquire()
        budget.record_request()
        _, load = router.choose(eligible(replicas), affinity)
        load.breaker.allow()
        load.outstanding += 1
        load.outstanding -= 1
        load.breaker.record(False)
        slot.release()
    return (time.perf_counter_ns() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    table = Table(title="Routing cost per request (in-process, ns)")
    for column in ("replicas", "affinity", "ns/request"):
        table.add_column(column, justify="right")
    prompt = "You are a helpful assistant. " * 20
    for n in (2, 8):
        for affinity in (None, prompt[:512]):
            cost = asyncio.run(per_request(fleet(n), affinity, args.requests))
            table.add_row(str(n), "yes" if affinity else "no", f"{cost:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
