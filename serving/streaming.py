"""SSE framing for streamed completions: every stream ends, and says how.

A stream we send ends in exactly one of two ways:
- the engine's chunks, at least one of which carries a ``finish_reason``, then ``[DONE]``;
- an error event in OpenAI's error shape, then ``[DONE]``, when the engine dies, breaks
  the connection, goes quiet past the idle timeout, sends garbage, or stops early.

When the client goes away, the generator is closed (Starlette cancels it); the engine
stream is closed in ``finally``, which drops the connection and makes vLLM abort.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from models.engines.client import EngineStream
from models.errors import EngineFailed, EngineRejected, WeirModelError
from serving.errors import render

log = logging.getLogger("weir.streaming")

DONE = b"data: [DONE]\n\n"
Fix = Callable[[dict[str, Any]], dict[str, Any] | None]  # None: drop the chunk
Ended = Callable[[BaseException | None], None]


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def replayed(chunks: list[dict[str, Any]]) -> AsyncGenerator[bytes, None]:
    """Stored chunks (a cache hit) as a stream's events, then ``[DONE]``."""
    for chunk in chunks:
        yield event(chunk)
    yield DONE


def error_event(exc: BaseException, request_id: str) -> bytes:
    _, body, _ = render(exc, request_id)
    return event(body)


def _engine_error(chunk: dict[str, Any]) -> Exception:
    """An error event sent by the engine itself in the middle of its stream."""
    inner = chunk.get("error")
    detail = inner if isinstance(inner, dict) else chunk
    message = str(detail.get("message") or "engine reported an error mid-stream")
    status = detail.get("code")
    if isinstance(status, int) and 400 <= status < 500:
        return EngineRejected(message, status=status)
    return EngineFailed(message)


async def relay(
    stream: EngineStream, fix: Fix, request_id: str, ended: Ended | None = None
) -> AsyncGenerator[bytes, None]:
    """Pass the engine's chunks through as they come, cleaned by ``fix``.

    ``ended(None)`` is called before a clean ``[DONE]``, ``ended(error)`` before an error
    event; neither when the client goes away first.
    """
    finished = False
    try:
        async for payload in stream:
            if payload == b"[DONE]":
                if not finished:
                    raise EngineFailed("engine ended the stream without a finish_reason")
                if ended is not None:
                    ended(None)
                yield DONE
                return
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise EngineFailed("engine sent a chunk that is not JSON") from exc
            if "error" in chunk or chunk.get("object") == "error":
                raise _engine_error(chunk)
            choices = chunk.get("choices") or ()
            if any(choice.get("finish_reason") for choice in choices):
                finished = True
            fixed = fix(chunk)
            if fixed is not None:
                yield event(fixed)
        raise EngineFailed("engine stream ended without [DONE]")
    except Exception as exc:
        if isinstance(exc, WeirModelError):
            log.warning("stream %s ended with an error: %s", request_id, exc)
        else:
            log.exception("stream %s failed unexpectedly", request_id)
        if ended is not None:
            ended(exc)
        yield error_event(exc, request_id)
        yield DONE
    finally:
        await stream.aclose()
