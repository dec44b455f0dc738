"""One of two real chat replicas killed with SIGKILL under load.

Non-streaming requests keep succeeding (retried on the other replica before any byte
is sent), streams in flight on the killed replica end with an error event and
``[DONE]`` (never silence), the supervisor restarts the engine, and it rejoins the
rotation once healthy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

PLAIN: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 8,
}
STREAM: dict[str, Any] = PLAIN | {"max_tokens": 96, "stream": True}
PLAIN_LOOPS, STREAM_LOOPS = 4, 4


@dataclass
class Tally:
    plain: list[tuple[int, float]] = field(default_factory=list)  # status, seconds
    streams: list[str] = field(default_factory=list)  # finished | error | silent
    run: asyncio.Event = field(default_factory=asyncio.Event)  # plain loops go while set
    stop: bool = False
    plain_in_flight: int = 0
    # streams opened whose first chunk has not come yet: a replica that dies before a
    # stream's first chunk is retried invisibly, so the kill waits until there are none
    streams_waiting: int = 0


def engine_pid(stack: Stack, port: int) -> int:
    for pid in stack.tree():
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and str(port) in cmdline:
            return pid
    raise AssertionError(f"no engine process on port {port}")


def replicas(stack: Stack, client: httpx.Client | None = None) -> dict[str, dict[str, Any]]:
    """The smollm2 replicas as the gateway process answering sees them (``client``'s)."""
    get = client.get if client is not None else httpx.get
    view = get(f"{stack.base_url}/weir/engines", timeout=10).json()["data"]
    return {e["replica"]: e for e in view if e["model"] == "smollm2"}


async def plain_loop(client: httpx.AsyncClient, tally: Tally) -> None:
    while not tally.stop:
        await tally.run.wait()
        started = time.monotonic()
        tally.plain_in_flight += 1
        try:
            answer = await client.post("/v1/chat/completions", json=PLAIN)
            status = answer.status_code
        except httpx.HTTPError:
            status = 0
        finally:
            tally.plain_in_flight -= 1
        tally.plain.append((status, time.monotonic() - started))


async def stream_loop(client: httpx.AsyncClient, tally: Tally) -> None:
    while not tally.stop:
        text = ""
        tally.streams_waiting += 1
        waiting = True
        async with client.stream("POST", "/v1/chat/completions", json=STREAM) as answer:
            async for line in answer.aiter_lines():
                if waiting and line.startswith("data:"):
                    tally.streams_waiting -= 1
                    waiting = False
                text += line + "\n"
        if waiting:
            tally.streams_waiting -= 1
        body = text.rstrip()
        if answer.status_code != 200:
            tally.streams.append(f"refused {answer.status_code}")
        elif not body.endswith("data: [DONE]"):
            tally.streams.append("silent")
        else:
            tally.streams.append("error" if '"error"' in body else "finished")


async def load_and_kill(stack: Stack, victim_port: int) -> tuple[Tally, float]:
    tally = Tally()
    tally.run.set()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
        loops = [asyncio.create_task(plain_loop(client, tally)) for _ in range(PLAIN_LOOPS)]
        loops += [asyncio.create_task(stream_loop(client, tally)) for _ in range(STREAM_LOOPS)]
        await asyncio.sleep(10)
        # Kill while a streaming answer is on the victim: pause plain requests, wait for the
        # victim to carry only streams already past their first chunk, then SIGKILL it and
        # let plain requests run on at once.
        tally.run.clear()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # only streams in flight, one on the victim
            victim = (await asyncio.to_thread(replicas, stack))["smollm2@135m-instruct#0"]
            if (
                tally.plain_in_flight == 0
                and tally.streams_waiting == 0
                and victim["outstanding"] >= 1
            ):
                break
            await asyncio.sleep(0.1)
        assert victim["outstanding"] >= 1, "no stream ever reached the victim"
        os.kill(engine_pid(stack, victim_port), signal.SIGKILL)
        killed_at = time.monotonic()
        tally.run.set()
        await asyncio.sleep(20)
        tally.stop = True
        tally.run.set()
        await asyncio.gather(*loops)
    return tally, killed_at


def test_killed_replica_costs_no_requests_and_rejoins(stack: Stack) -> None:
    before = replicas(stack)
    victim_url = before["smollm2@135m-instruct#0"]["base_url"]
    victim_port = int(victim_url.rsplit(":", 1)[1])
    tally, _ = asyncio.run(load_and_kill(stack, victim_port))

    statuses = [s for s, _ in tally.plain]
    ok = statuses.count(200) / len(statuses)
    p99 = statistics.quantiles([t for _, t in tally.plain], n=100)[98]
    print(
        f"\nreplica kill: {len(statuses)} plain requests, success {ok:.2%}, p99 {p99:.2f}s;"
        f" streams {dict((k, tally.streams.count(k)) for k in set(tally.streams))}"
    )
    assert ok >= 0.999, sorted(set(statuses))
    assert "silent" not in tally.streams, tally.streams
    assert "error" in tally.streams, (tally.streams, stack.log_tail())  # the victim's said so

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        victim = replicas(stack)["smollm2@135m-instruct#0"]
        if victim["healthy"] and victim["restarts"] == 1:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the killed replica never came back: {replicas(stack)}")
    # One connection, so one gateway process routes these requests and shows its counts
    # (with --workers each worker routes and counts on its own: its /weir/engines says so)
    one = httpx.Limits(max_connections=1)
    with httpx.Client(base_url=stack.base_url, timeout=120, limits=one) as client:
        served = replicas(stack, client)["smollm2@135m-instruct#0"]["requests"]
        for _ in range(30):  # least-outstanding: the idle newcomer gets its share
            client.post("/v1/chat/completions", json=PLAIN).raise_for_status()
            if replicas(stack, client)["smollm2@135m-instruct#0"]["requests"] > served:
                break
        after = replicas(stack, client)["smollm2@135m-instruct#0"]
    assert after["requests"] > served, after
    assert after["breaker"] == "closed"
