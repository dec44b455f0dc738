"""Where a request's time goes inside the gateway, stage by stage, warm and cold.

    python -m bench.path_timing [--requests 300] [--interval-ms 10]

Runs ``weir``'s app in this process (uvicorn, uvloop, the connection guard, as ``weir
serve`` does), pinned to core 1, in front of ``bench.mock_engine`` on core 0, and marks
the time at each stage of the path (the marks wrap the stages' functions; each costs
about a microsecond). Two workloads, from an httpx keep-alive client on core 0:

- **streams**: each request a stream of 16 tokens paced ``--interval-ms`` apart by the
  mock, one after another: the path for the next request runs after a whole stream of
  mostly idle time (what ``bench.overhead``'s TTFT measures);
- **answers**: non-streaming requests back to back: the same path, run every
  millisecond or so (what ``bench.overhead``'s added latency measures).

The table gives each stage's median time from the gateway's first sight of the request
(``Front``), so the two columns show the same code warm and cold. On this project's
2-core VM the stretch to the engine request took about 180 µs warm and 490 µs cold; see
``bench.idle_penalty`` for the same effect on one function.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.procs import free_port, gateway_config, start, stop_all, wait_for

STAGES = (
    ("front", "request seen (Front)"),
    ("endpoint", "route matched"),
    ("handle", "body read and validated"),
    ("prepare", "use case: model resolved"),
    ("limits", "prompt prepared"),
    ("queue", "limits admitted"),
    ("post", "slot taken, request to the engine"),
    ("post_done", "engine's response head in"),
    ("first_out", "first event or answer out"),
    ("content_in", "first content chunk in (streams)"),
    ("content_out", "first content chunk out (streams)"),
)
CLIENT = """
import sys, httpx
port, stream, count = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
body = {"model": "smollm2", "max_tokens": 16, "stream": stream,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}
with httpx.Client(timeout=30, headers={"authorization": "Bearer k"}) as client:
    for _ in range(count):
        with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            for _ in r.iter_raw():
                pass
"""


class Marks:
    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.done: list[dict[str, float]] = []

    def mark(self, name: str) -> None:
        self.current.setdefault(name, time.perf_counter())

    def end(self) -> None:
        if self.current:
            self.done.append(self.current)
        self.current = {}

    def on_entry(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.mark(name)
            return await original(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def after(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return await original(*args, **kwargs)
            finally:
                self.mark(name)

        setattr(owner, attr, wrapped)


def instrument(marks: Marks) -> None:
    import models.engines.h1 as h1
    import serving.core.contract as contract
    import serving.core.proxy as proxy
    import serving.http.front as front
    import serving.http.model_routes as routes
    import serving.http.rendering as rendering

    marks.on_entry(front.Front, "__call__", "front")
    marks.on_entry(routes.ModelEndpoint, "__call__", "endpoint")
    marks.on_entry(proxy.Proxy, "handle", "handle")
    marks.on_entry(contract, "prepare_async", "prepare")
    marks.on_entry(proxy.Proxy, "_admit", "limits")
    marks.on_entry(proxy.Proxy, "_queue", "queue")
    marks.on_entry(h1.Upstream, "post", "post")
    marks.after(h1.Upstream, "post", "post_done")
    original_front = front.Front.__call__

    async def whole(self: Any, scope: Any, receive: Any, send: Any) -> None:
        async def watched(message: Any) -> None:
            if message["type"] == "http.response.body":
                marks.mark("first_out")
                if b"tok0" in message.get("body", b""):
                    marks.mark("content_out")
            await send(message)

        try:
            await original_front(self, scope, receive, watched)
        finally:
            if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
                marks.end()
            else:
                marks.current.clear()  # /readyz and the like: not measured

    front.Front.__call__ = whole  # type: ignore[method-assign]
    received: Callable[..., None] = h1._Connection.data_received

    def data_received(self: Any, data: bytes) -> None:
        if b"tok0" in data:
            marks.mark("content_in")
        received(self, data)

    h1._Connection.data_received = data_received  # type: ignore[method-assign]
    _ = rendering  # the SSE response sends through Front's send: marked there


def run(requests: int, interval_ms: float) -> dict[str, dict[str, float]]:
    import uvicorn

    from serving.http import connection_guard
    from serving.http.app import create_app
    from serving.http.connection_guard import GuardedHttpTools
    from serving.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="weir-path-"))
    mock_port, port = free_port(), free_port()
    mock = start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock_port),
                  "--interval-ms", str(interval_ms)], work / "mock.log", cpus={0})  # fmt: skip
    wait_for(f"http://127.0.0.1:{mock_port}/health")
    config = work / "weir.toml"
    config.write_text(gateway_config(port, mock_port, work, key="k"))
    os.sched_setaffinity(0, {1})
    marks = Marks()
    instrument(marks)
    settings = load_settings(config)
    connection_guard.configure(settings.gateway)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, loop="uvloop",
        http=GuardedHttpTools, log_level="warning", access_log=False,
    ))  # fmt: skip
    results: dict[str, dict[str, float]] = {}

    def clients() -> None:
        try:
            wait_for(f"http://127.0.0.1:{port}/readyz", 60)
            for label, stream in (("streams", "1"), ("answers", "0")):
                marks.done.clear()
                subprocess.run(["taskset", "-c", "0", sys.executable, "-c", CLIENT, str(port),
                                stream, str(requests)], check=True)  # fmt: skip
                rows = marks.done[requests // 10 :]  # past the warm-up
                results[label] = {
                    name: statistics.median(r[name] - r["front"] for r in rows if name in r) * 1e6
                    for name, _ in STAGES
                    if any(name in r for r in rows)
                }
        finally:
            server.should_exit = True

    threading.Thread(target=clients, daemon=True).start()
    try:
        server.run()
    finally:
        stop_all([mock])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    args = parser.parse_args()
    results = run(args.requests, args.interval_ms)
    table = Table(title="Median µs from Front's first sight of the request, gateway on one core")
    table.add_column("stage reached")
    table.add_column(f"streams (paced {args.interval_ms:g} ms)", justify="right")
    table.add_column("answers, back to back", justify="right")
    for name, label in STAGES:
        cells = [f"{results[k][name]:.0f}" if name in results.get(k, {}) else "-"
                 for k in ("streams", "answers")]  # fmt: skip
        table.add_row(label, *cells)
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
