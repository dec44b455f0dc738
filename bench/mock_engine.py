"""A fast mock upstream that speaks the OpenAI API like vLLM's server, for overhead runs.

Non-streaming answers are returned at once; streams send ``--chunks`` content chunks
``--interval-ms`` apart, then a finish chunk, a usage chunk and ``[DONE]``. ``/health``
and ``/v1/models`` answer as vLLM's do. Black-box: imports nothing of Weir's.

    python -m bench.mock_engine --port 9100 [--chunks 16] [--interval-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

ANSWER = "The capital of France is Paris."


def completion(model: str, prompt_tokens: int) -> dict[str, object]:
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
            "completion_tokens": 8,
            "total_tokens": prompt_tokens + 8,
        },
    }


def make_app(chunks: int, interval_s: float) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "mock", "object": "model", "max_model_len": 8192}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", "mock"))
        if not body.get("stream"):
            return web.json_response(completion(model, 10))
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
            if interval_s:
                await asyncio.sleep(interval_s)
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

    app = web.Application()
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
    args = parser.parse_args()
    web.run_app(
        make_app(args.chunks, args.interval_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
