"""An in-process engine implementing ``models.engines.client.Engine``.

It answers like vLLM's OpenAI server (including its nulls) and can be told to fail:
``die_after`` chunks into a stream, ``hang`` before answering, or answer with an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from models.engines.client import EngineStream
from models.errors import EngineError, EngineFailed
from tests.fakes.embedder import vector

JSON = dict[str, Any]


PROMPT_IDS = [1, 2, 3]  # the ids vLLM returns for a prompt (echo, return_token_ids)


def _stop_reason(body: JSON) -> str | None:
    """vLLM's ``stop_reason``: the stop string that ended it (the fake's: the first asked)."""
    stop = body.get("stop")
    return stop if isinstance(stop, str) else (stop[0] if stop else None)


def logprobs_of(words: list[str]) -> JSON:
    """vLLM's chat ``logprobs`` for these tokens: ``content`` only, no ``refusal``."""
    entries = [
        {"token": w, "logprob": -0.5, "bytes": list(w.encode()), "top_logprobs": []} for w in words
    ]
    return {"content": entries}


def embedding_of(text: Any) -> list[float]:
    """The fake's vector for a text: 16 float32-exact numbers, the same every time."""
    return vector(str(text), 16)


@dataclass
class FakeEngine:
    name: str = "fake"
    words: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    die_after: int | None = None  # raise EngineFailed after this many content chunks
    end_without_done: bool = False
    hang_s: float = 0.0
    fail_with: EngineError | None = None
    healthy: bool = True
    content: str | None = None  # the whole answer instead of the joined words
    finish_reason: str = "stop"  # "length": the answer was cut off by max_tokens
    first_chunk_delay_s: float = 0.0
    # a stream waits on it after its last content chunk (finish_reason sent), before the
    # usage chunk and [DONE]: a client can leave there, with the whole answer delivered
    hold_before_done: asyncio.Event | None = None
    calls: list[JSON] = field(default_factory=list)
    closed_streams: int = 0
    cancelled: int = 0  # calls cancelled while in flight (client went away)

    async def complete(self, path: str, body: JSON) -> JSON:
        self.calls.append(body)
        await self._before()
        if path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            # a vector that says which text it is for (exact in float32)
            data = [
                {"index": i, "object": "embedding", "embedding": embedding_of(text)}
                for i, text in enumerate(inputs)
            ]
            return {
                "id": "embd-1",
                "object": "list",
                "created": int(time.time()),
                "model": body["model"],
                "data": data,
                "usage": {
                    "prompt_tokens": 2,
                    "total_tokens": 2,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        text = self.content if self.content is not None else "".join(self.words)
        if path == "/v1/completions":
            echo = body.get("echo")
            choice: JSON = {
                "index": 0,
                "text": f"{body['prompt']}{text}" if echo else text,
                "logprobs": None,
                "finish_reason": self.finish_reason,
                "stop_reason": _stop_reason(body),
                "token_ids": PROMPT_IDS if body.get("return_token_ids") else None,
                "prompt_logprobs": None,
                "prompt_token_ids": PROMPT_IDS if echo or body.get("return_token_ids") else None,
            }
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": logprobs_of(self.words) if body.get("logprobs") else None,
                "finish_reason": self.finish_reason,
                "stop_reason": _stop_reason(body),
                "token_ids": PROMPT_IDS if body.get("return_token_ids") else None,
            }
            obj = "chat.completion"
        return {
            "id": "cmpl-1",
            "object": obj,
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": "vllm-fake",
            "kv_transfer_params": None,
            "prompt_token_ids": PROMPT_IDS if body.get("return_token_ids") else None,
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": len(self.words),
                "total_tokens": 5 + len(self.words),
                "prompt_tokens_details": None,
            },
        }

    async def open_stream(self, path: str, body: JSON) -> EngineStream:
        self.calls.append(body)
        await self._before()
        return _FakeStream(self, body, path)

    async def health(self) -> bool:
        return self.healthy

    async def aclose(self) -> None:
        return None

    async def _before(self) -> None:
        if self.hang_s:
            try:
                await asyncio.sleep(self.hang_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail_with is not None:
            raise self.fail_with


class _FakeStream:
    """vLLM's chunks for the route asked: chat deltas, or text pieces for completions."""

    def __init__(self, engine: FakeEngine, body: JSON, path: str) -> None:
        self.engine = engine
        self.body = body
        self.chat = path != "/v1/completions"

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        base = {
            "id": "chatcmpl-1" if self.chat else "cmpl-1",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": 1,
            "model": self.body["model"],
        }
        first: JSON = {"index": 0, "logprobs": None, "finish_reason": None}
        first |= {"delta": {"role": "assistant", "content": ""}} if self.chat else {"text": ""}
        if self.engine.first_chunk_delay_s:
            try:
                await asyncio.sleep(self.engine.first_chunk_delay_s)
            except asyncio.CancelledError:
                self.engine.cancelled += 1
                raise
        ids = bool(self.body.get("return_token_ids"))
        if self.chat:  # vLLM's chat stream: the prompt's ids on the first chunk
            yield orjson.dumps(
                base | {"choices": [first], "prompt_token_ids": PROMPT_IDS if ids else None}
            )
        else:  # its completions: on the first choice, when echoed (with the prompt) or asked
            echo = self.body.get("echo")
            first["text"] = str(self.body["prompt"]) if echo else ""
            first["prompt_token_ids"] = PROMPT_IDS if echo or ids else None
            yield orjson.dumps(base | {"choices": [first]})
        for n, word in enumerate(self.engine.words):
            if self.engine.die_after is not None and n >= self.engine.die_after:
                raise EngineFailed("connection to engine fake broke: ServerDisconnectedError")
            last = n == len(self.engine.words) - 1
            scored = self.chat and self.body.get("logprobs")
            choice: JSON = {
                "index": 0,
                **({"delta": {"content": word}} if self.chat else {"text": word}),
                "logprobs": logprobs_of([word]) if scored else None,
                "finish_reason": self.engine.finish_reason if last else None,
                "stop_reason": _stop_reason(self.body) if last else None,
                "token_ids": PROMPT_IDS if ids else None,
            }
            yield orjson.dumps(base | {"choices": [choice]})
            await asyncio.sleep(0)
        if self.engine.hold_before_done is not None:
            try:
                await self.engine.hold_before_done.wait()
            except asyncio.CancelledError:
                self.engine.cancelled += 1
                raise
        if self.engine.end_without_done:
            return
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": len(self.engine.words),
            "total_tokens": 5 + len(self.engine.words),
        }
        yield orjson.dumps(base | {"choices": [], "usage": usage})
        yield b"[DONE]"

    async def aclose(self) -> None:
        self.engine.closed_streams += 1
