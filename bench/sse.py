"""Client-side timing of an OpenAI SSE stream: TTFT, every inter-token gap, end to end.

Feed it the bytes as they arrive (``feed``), in whatever pieces the socket delivers,
then ``finish``. Times come from an injectable nanosecond clock, so a scripted stream
with known gaps tests it exactly. TTFT is the first chunk whose delta carries non-empty
content (a role-only first chunk does not count); gaps are between content chunks;
tokens come from the server's ``usage``, never from counting chunks.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], int]


@dataclass
class StreamTiming:
    started_ns: int
    first_content_ns: int | None = None
    content_ns: list[int] = field(default_factory=list)
    ended_ns: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # the error event's code (or type), if the stream sent one
    done: bool = False  # saw [DONE]

    @property
    def ttft_ms(self) -> float | None:
        if self.first_content_ns is None:
            return None
        return (self.first_content_ns - self.started_ns) / 1e6

    @property
    def gaps_ms(self) -> list[float]:
        stamps = self.content_ns
        return [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)]

    @property
    def e2e_ms(self) -> float | None:
        return None if self.ended_ns is None else (self.ended_ns - self.started_ns) / 1e6

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and self.finish_reason is not None


class SSETimer:
    def __init__(self, clock: Clock = time.perf_counter_ns, started_ns: int | None = None) -> None:
        self.clock = clock
        self.timing = StreamTiming(started_ns=clock() if started_ns is None else started_ns)
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        now = self.clock()
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip(), now)

    def finish(self) -> StreamTiming:
        self.timing.ended_ns = self.clock()
        return self.timing

    def _event(self, payload: bytes, now: int) -> None:
        if payload == b"[DONE]":
            self.timing.done = True
            return
        try:
            chunk: dict[str, Any] = json.loads(payload)
        except ValueError:
            self.timing.error = "bad_chunk"
            return
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            self.timing.error = str(error.get("code") or error.get("type") or "error")
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") or choice.get("text")
            if text:
                if self.timing.first_content_ns is None:
                    self.timing.first_content_ns = now
                self.timing.content_ns.append(now)
            if choice.get("finish_reason"):
                self.timing.finish_reason = str(choice["finish_reason"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.timing.prompt_tokens = usage.get("prompt_tokens")
            self.timing.completion_tokens = usage.get("completion_tokens")
