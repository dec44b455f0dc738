"""The engine SSE parser (``models.engines.sse``) on 10,000 vLLM-shaped chunk events.

Two read shapes: one event per read (vLLM's token-by-token stream on loopback) and
64 KiB reads holding many events (a busy connection or a buffering proxy), each with LF
and with CRLF framing. Prints the best of 20 runs per shape, in ms per 10,000 events.

    .venv/bin/python -m bench.sse_parse
"""

from __future__ import annotations

import time

import orjson

from models.engines.sse import SseParser

EVENTS = 10_000
RUNS = 20


def events(n: int, newline: bytes) -> list[bytes]:
    return [
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": f"tok{i}"},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        + newline * 2
        for i in range(n)
    ]


def parse(reads: list[bytes]) -> int:
    parser = SseParser()
    seen = 0
    for read in reads:
        seen += len(parser.feed(read))
    return seen + len(parser.end())


def best_ms(reads: list[bytes]) -> float:
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter()
        seen = parse(reads)
        best = min(best, time.perf_counter() - started)
        if seen != EVENTS:
            raise SystemExit(f"parsed {seen} events, not {EVENTS}")
    return best * 1e3


def main() -> None:
    for framing, newline in (("LF", b"\n"), ("CRLF", b"\r\n")):
        one_per_read = events(EVENTS, newline)
        joined = b"".join(one_per_read)
        big_reads = [joined[i : i + 65536] for i in range(0, len(joined), 65536)]
        for shape, reads in (("one event per read", one_per_read), ("64 KiB reads", big_reads)):
            print(f"{framing:4} {shape:18}: {best_ms(reads):6.2f} ms per {EVENTS:,} events")


if __name__ == "__main__":
    main()
