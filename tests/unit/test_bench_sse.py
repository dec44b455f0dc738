"""SSE timing on scripted streams with known gaps (``bench/sse.py``)."""

from __future__ import annotations

import json

import pytest

from bench.sse import SSETimer

MS = 1_000_000


class ScriptedClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'


def test_known_gaps_are_measured_exactly() -> None:
    clock = ScriptedClock()
    timer = SSETimer(clock, started_ns=0)
    script = [
        (5, chunk("", role=True)),  # role-only: not the first token
        (40, chunk("Hel")),
        (55, chunk("lo")),
        (90, chunk("!", finish="stop")),
        (91, USAGE),
        (92, b"data: [DONE]\n\n"),
    ]
    for at_ms, data in script:
        clock.now = at_ms * MS
        timer.feed(data)
    clock.now = 93 * MS
    timing = timer.finish()
    assert timing.ttft_ms == 40
    assert timing.gaps_ms == [15, 35]
    assert timing.e2e_ms == 93
    assert (timing.prompt_tokens, timing.completion_tokens) == (7, 3)
    assert timing.finish_reason == "stop"
    assert timing.ok


def test_events_split_across_reads_are_timed_when_complete() -> None:
    clock = ScriptedClock()
    timer = SSETimer(clock, started_ns=0)
    data = chunk("a") + chunk("b", finish="length") + b"data: [DONE]\n\n"
    clock.now = 10 * MS
    timer.feed(data[:9])  # half an event: nothing yet
    assert timer.timing.first_content_ns is None
    clock.now = 20 * MS
    timer.feed(data[9:])  # both events land in this read
    timing = timer.finish()
    assert timing.ttft_ms == 20
    assert timing.gaps_ms == [0]  # coalesced by the network: the gap shows it
    assert timing.done


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            b'data: {"error": {"type": "server_error", "code": "engine_error"}}\n\n',
            "engine_error",
        ),
        (b"data: not json\n\n", "bad_chunk"),
    ],
)
def test_errors_are_recorded(data: bytes, error: str) -> None:
    timer = SSETimer(ScriptedClock(), started_ns=0)
    timer.feed(chunk("a") + data + b"data: [DONE]\n\n")
    timing = timer.finish()
    assert timing.error == error
    assert not timing.ok


def test_a_stream_that_just_stops_is_not_ok() -> None:
    timer = SSETimer(ScriptedClock(), started_ns=0)
    timer.feed(chunk("a"))
    assert not timer.finish().ok


def test_completions_text_counts_as_content() -> None:
    clock = ScriptedClock()
    timer = SSETimer(clock, started_ns=0)
    clock.now = 7 * MS
    timer.feed(b'data: {"choices": [{"index": 0, "text": "Paris", "finish_reason": null}]}\n\n')
    assert timer.finish().ttft_ms == 7
