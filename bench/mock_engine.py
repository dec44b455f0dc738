"""A fast mock upstream that speaks the OpenAI API like vLLM's server, for overhead runs.

Non-streaming answers come after ``--delay-ms`` (default at once) and use ``max_tokens``
completion tokens when the request gives it (as vLLM with ``ignore_eos`` would); streams
send ``--chunks`` content chunks ``--interval-ms`` apart, then a finish chunk, a usage
chunk and ``[DONE]``. ``/health`` and ``/v1/models`` answer as vLLM's do.

Faults on demand, for tests, by a marker in the last message: ``[fail]`` answers 500,
``[hang]`` never answers (60 s), ``[break]`` drops a stream half-way, ``[slow]`` streams
at 200 ms a chunk.
Black-box: imports nothing of Weir's.

    python -m bench.mock_engine --port 9100 [--chunks 16] [--interval-ms 10] [--delay-ms 0]
        [--capacity 0] [--stream-capacity 0] [--reuse-port]

``--stream-capacity N`` lets N streams run at once and queues the rest before their first
chunk (an engine's batch), so TTFT grows with load and an SLO sweep has a knee to find.
``--slots N`` is one batch of N for answers and streams together (a shared engine, its
queue first come, first served: what fair-queueing benchmarks put behind the gateway).
``--reuse-port`` lets several mock processes share one port (a load box's worth of mock).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

import numpy as np
from aiohttp import web

ANSWER = "The capital of France is Paris."


def completion(model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _marker(body: dict[str, object]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


def mock_vector(text: str, dim: int = 384) -> list[float]:
    """The mock's embedding of ``text``: a unit vector seeded by its hash (float32-exact)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    values = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return [float(v) for v in (values / np.linalg.norm(values)).astype(np.float32)]


def make_app(
    chunks: int,
    interval_s: float,
    delay_s: float = 0.0,
    capacity: int = 0,
    stream_capacity: int = 0,
    shared: int = 0,
) -> web.Application:
    # an engine's batch: at most ``capacity`` answers in the works, the rest wait their turn
    slots = asyncio.Semaphore(capacity) if capacity > 0 else None
    stream_slots = asyncio.Semaphore(stream_capacity) if stream_capacity > 0 else None
    if shared > 0:  # one batch for answers and streams alike, first come first served
        slots = stream_slots = asyncio.Semaphore(shared)

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "mock", "object": "model", "max_model_len": 8192}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", "mock"))
        marker = _marker(body)
        if "[fail]" in marker:
            error = {"object": "error", "message": "injected failure", "code": 500}
            return web.json_response(error, status=500)
        if "[hang]" in marker:
            await asyncio.sleep(60)
        if not body.get("stream"):
            if slots is not None:
                async with slots:
                    await asyncio.sleep(delay_s)
            elif delay_s:
                await asyncio.sleep(delay_s)
            max_tokens = body.get("max_tokens")
            used = max_tokens if isinstance(max_tokens, int) else 8
            return web.json_response(completion(model, 10, used))
        if stream_slots is not None:
            async with stream_slots:
                return await stream(request, model, marker)
        return await stream(request, model, marker)

    async def stream(request: web.Request, model: str, marker: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        base = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        async def send(payload: dict[str, object]) -> None:
            await response.write(b"data: " + json.dumps(base | payload).encode() + b"\n\n")

        await send(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
        )
        for n in range(chunks):
            if "[break]" in marker and n == chunks // 2:
                if request.transport is not None:
                    request.transport.close()
                return response
            pause = 0.2 if "[slow]" in marker else interval_s
            if pause:
                await asyncio.sleep(pause)
            last = n == chunks - 1
            choice = {
                "index": 0,
                "delta": {"content": f" tok{n}"},
                "logprobs": None,
                "finish_reason": "length" if last else None,
            }
            await send({"choices": [choice]})
        await send(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": chunks,
                    "total_tokens": 10 + chunks,
                },
            }
        )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": mock_vector(str(text))}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(len(str(t).split()) for t in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response(
            {"object": "list", "model": body.get("model"), "data": data, "usage": usage}
        )

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="before non-stream answers")
    parser.add_argument(
        "--capacity", type=int, default=0, help="answers at a time (0: unbounded), like a batch"
    )
    parser.add_argument("--stream-capacity", type=int, default=0, help="streams at a time")
    parser.add_argument(
        "--slots", type=int, default=0, help="answers and streams at a time, one line for both"
    )
    parser.add_argument("--reuse-port", action="store_true", help="share the port with others")
    args = parser.parse_args()
    web.run_app(
        make_app(
            args.chunks,
            args.interval_ms / 1000,
            args.delay_ms / 1000,
            args.capacity,
            args.stream_capacity,
            args.slots,
        ),
        host="127.0.0.1",
        port=args.port,
        reuse_port=args.reuse_port or None,
        print=None,
        access_log=None,
        shutdown_timeout=1.0,  # [hang] handlers would hold a graceful stop for a minute
    )


if __name__ == "__main__":
    main()
