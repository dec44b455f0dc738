"""The usage ledger loses nothing while its PostgreSQL is killed: 10,000 requests, two crashes.

A mock engine (``bench.mock_engine``) and one ``weir serve`` in front of it whose ledger
is a real PostgreSQL (``ledger.url``). ``--requests`` chat requests go through the
gateway, ``--concurrency`` at a time (one in ten streamed, with usage); each time another
``1/(kills+1)`` of them is done, the database gets SIGKILL (the postmaster and every
backend: a crash, no shutdown) and comes back ``--down-s`` later on the same data. No
request may fail for it. At the end, once ``weir_ledger_backlog_rows`` is back to 0:

- the database holds one row per request (``--requests`` rows, as many request ids);
- its prompt and completion token totals equal ``tokens_used_total`` on ``/metrics``, and
  its row count the requests ``weir_requests_total`` counted;
- ``GET /weir/admin/usage`` says the same.

It reports the backlog's peak while the database was down and how long the gateway
took to write it once the database was back.

Black-box: ``weir`` as a command, HTTP, and SQL on the database for the count.
``run`` is what the integration test calls (1,000 requests, one crash).

    python -m bench.ledger_crash [--requests 10000] [--kills 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for

KEY = "sk-ledger-crash"
ADMIN = "admin-key-for-ledger-crash"
CHAT = "/v1/chat/completions"


class Database(Protocol):
    """A PostgreSQL this script may crash: ``tests.postgres_server.PostgresServer``."""

    url: str

    def kill(self) -> None: ...

    def restart(self) -> Database: ...


def gateway_toml(port: int, mock: int, work: Path, database_url: str) -> str:
    return weir_toml(
        gateway={"port": port, "api_keys": [KEY]},
        keys={"enabled": True, "file": str(work / "keys.json"), "admin_key": ADMIN},
        engines={"log_dir": work / "engines"},
        billing={"prices": [{"model": "smollm2", "prompt_per_m": 1.0, "completion_per_m": 2.0}]},
        ledger={"url": database_url, "spill_dir": str(work / "spill"), "retry_s": 1.0,
                "timeout_s": 2.0},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}",
                      routing={"max_in_flight": 256, "max_queue": 1024})],
    )  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        found = pattern.match(line)
        if found is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found.group(2))
    return total


def body(i: int, rng: random.Random) -> dict[str, Any]:
    made: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": rng.randint(1, 64),
    }
    if i % 10 == 0:
        made |= {"stream": True, "stream_options": {"include_usage": True}}
    return made


async def load(
    base: str, requests: int, concurrency: int, marks: list[int], crash: Any
) -> dict[str, Any]:
    """``requests`` requests, ``concurrency`` at a time; ``crash(k)`` is awaited (beside the
    load) when ``marks[k]`` of them are done."""
    rng = random.Random(24)
    bodies = [body(i, rng) for i in range(requests)]
    statuses: dict[int, int] = {}
    done = 0
    queue = iter(range(requests))
    crashes: list[asyncio.Task[Any]] = []
    headers = {"authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=30, headers=headers, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            for i in queue:
                if bodies[i].get("stream"):
                    async with client.stream("POST", f"{base}{CHAT}", json=bodies[i]) as answer:
                        async for _ in answer.aiter_raw():
                            pass
                else:
                    answer = await client.post(f"{base}{CHAT}", json=bodies[i])
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                done += 1
                if len(crashes) < len(marks) and done >= marks[len(crashes)]:
                    crashes.append(asyncio.create_task(crash(len(crashes))))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.monotonic() - started
        crashed = await asyncio.gather(*crashes)
    return {"statuses": statuses, "seconds": seconds, "crashes": crashed}


def backlog(base: str) -> float:
    return metric(httpx.get(f"{base}/metrics", timeout=10).text, "weir_ledger_backlog_rows")


def database_totals(url: str) -> dict[str, int]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(completion_tokens), 0), coalesce(sum(cost_nano), 0) FROM usage"
        ).fetchone()
    assert row is not None
    rows, ids, prompt, completion, cost = (int(v) for v in row)
    return {"rows": rows, "request_ids": ids, "prompt_tokens": prompt,
            "completion_tokens": completion, "cost_nano": cost}  # fmt: skip


def run(
    base: str, database: Database, requests: int, kills: int, concurrency: int = 32,
    down_s: float = 3.0,
) -> dict[str, Any]:  # fmt: skip
    """The load with ``kills`` crashes of ``database``; the figures and the checks'
    failures (``wrong``)."""
    holder = {"db": database}
    marks = [requests * (k + 1) // (kills + 1) for k in range(kills)]
    one_at_a_time = asyncio.Lock()

    async def crash(k: int) -> dict[str, float]:
        async with one_at_a_time:
            return await crash_once()

    async def crash_once() -> dict[str, float]:
        await asyncio.to_thread(holder["db"].kill)
        killed = time.monotonic()
        peak = 0.0
        while time.monotonic() - killed < down_s:
            peak = max(peak, await asyncio.to_thread(backlog, base))
            await asyncio.sleep(0.1)
        holder["db"] = await asyncio.to_thread(holder["db"].restart)
        back = time.monotonic()
        return {"down_s": round(back - killed, 2), "backlog_peak": peak}

    figures = asyncio.run(load(base, requests, concurrency, marks, crash))
    back = time.monotonic()
    deadline = back + 120
    # every request ended (a stream's row is taken as it ends, maybe after its client
    # read the last byte), then nothing left to write
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        ended = metric(text, "weir_requests_total") >= requests
        if ended and not metric(text, "weir_ledger_backlog_rows"):
            break
        time.sleep(0.1)
    figures["drained_s"] = round(time.monotonic() - back, 2)
    figures["backlog_left"] = backlog(base)
    text = httpx.get(f"{base}/metrics", timeout=10).text
    figures["metrics"] = {
        "prompt_tokens": int(metric(text, "tokens_used_total", type="prompt")),
        "completion_tokens": int(metric(text, "tokens_used_total", type="completion")),
        "requests": int(metric(text, "weir_requests_total")),
        "rows_written": int(metric(text, "weir_ledger_rows_written_total")),
        "rows_spilled": int(metric(text, "weir_ledger_spilled_rows_total")),
        "write_failures": int(metric(text, "weir_ledger_write_failures_total")),
    }
    figures["database"] = database_totals(holder["db"].url)
    report = httpx.get(
        f"{base}/weir/admin/usage", params={"since": "1d", "by": "model"}, timeout=30,
        headers={"authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    report.raise_for_status()
    figures["report"] = report.json()["total"]
    figures["requests"] = requests
    figures["kills"] = len(figures["crashes"])
    figures["wrong"] = check(figures)
    return figures


def check(f: dict[str, Any]) -> list[str]:
    wrong = []
    n, db, m, rep = f["requests"], f["database"], f["metrics"], f["report"]
    if f["statuses"] != {200: n}:
        wrong.append(f"statuses {f['statuses']}: a request failed")
    if (db["rows"], db["request_ids"]) != (n, n):
        wrong.append(f"database has {db['rows']} rows, {db['request_ids']} request ids, not {n}")
    tokens = ("prompt_tokens", "completion_tokens")
    if [db[t] for t in tokens] != [m[t] for t in tokens]:
        wrong.append(f"database tokens {db} != metrics {m}")
    if m["requests"] != n:
        wrong.append(f"weir_requests_total {m['requests']} != {n}")
    if (rep["requests"], rep["prompt_tokens"], rep["completion_tokens"], rep["cost_nano"]) != (
        db["rows"],
        db["prompt_tokens"],
        db["completion_tokens"],
        db["cost_nano"],
    ):
        wrong.append(f"usage report {rep} != database {db}")
    if f["backlog_left"]:
        wrong.append(f"backlog {f['backlog_left']} rows never written")
    if f["kills"] and not any(c["backlog_peak"] > 0 for c in f["crashes"]):
        wrong.append("the backlog never grew: the crashes missed the load")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--down-s", type=float, default=3.0)
    parser.add_argument("--out", default="bench-results/ledger_crash.json")
    args = parser.parse_args()
    # the test suite's PostgreSQL (initdb in a temp dir, crash = SIGKILL to its group)
    from tests.postgres_server import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="weir-ledger-"))
    database = PostgresServer(work)
    mock, port = free_port(), free_port()
    procs = [start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock)],
                   work / "mock.log")]  # fmt: skip
    procs.append(start_gateway(gateway_toml(port, mock, work, database.url), work, "gateway"))
    base = f"http://127.0.0.1:{port}"
    holder: list[Database] = [database]

    class Tracked:
        """The database, with the restarted server kept for the final stop."""

        url = database.url

        def kill(self) -> None:
            holder[0].kill()

        def restart(self) -> Database:
            holder[0] = holder[0].restart()
            return self

    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        wait_for(f"{base}/readyz", 120)
        result = run(base, Tracked(), args.requests, args.kills, args.concurrency, args.down_s)
    finally:
        stop_all(procs)
        server = holder[0]
        assert isinstance(server, PostgresServer)
        server.stop()
        server.remove()
    summary(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {out}")
    if result["wrong"]:
        raise SystemExit(1)


def summary(f: dict[str, Any]) -> None:
    db, m = f["database"], f["metrics"]
    print(f"{f['requests']} requests in {f['seconds']:.1f} s, statuses {f['statuses']};"
          f" PostgreSQL killed {f['kills']}x: {f['crashes']}")  # fmt: skip
    print(f"database: {db['rows']} rows ({db['request_ids']} request ids), prompt"
          f" {db['prompt_tokens']}, completion {db['completion_tokens']}, cost {db['cost_nano']}"
          " nano-$")  # fmt: skip
    print(f"metrics: requests {m['requests']}, prompt {m['prompt_tokens']}, completion"
          f" {m['completion_tokens']}; rows written {m['rows_written']}, spilled"
          f" {m['rows_spilled']}, failed batches {m['write_failures']}")  # fmt: skip
    print(f"backlog written {f['drained_s']} s after the load ended; left {f['backlog_left']}")
    print("checks: " + ("all hold" if not f["wrong"] else "; ".join(f["wrong"])))


if __name__ == "__main__":
    main()
