"""``models.engines.sse``: WHATWG event-stream parsing of the engine's stream, whatever the
framing (LF, CRLF, lone CR, mixed) and wherever the reads split it."""

from __future__ import annotations

import pytest

from models.engines.sse import MAX_EVENT_BYTES, EventTooLarge, SseParser


def parse(reads: list[bytes]) -> list[bytes]:
    parser = SseParser()
    out: list[bytes] = []
    for read in reads:
        out += parser.feed(read)
    return out + parser.end()


# (stream, the data of each event it dispatches)
CASES = [
    (b'data: {"a":1}\n\ndata: [DONE]\n\n', [b'{"a":1}', b"[DONE]"]),
    (b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n', [b'{"a":1}', b"[DONE]"]),
    (b"data: x\r\rdata: y\r\r", [b"x", b"y"]),
    (b"data: x\r\n\ndata: y\n\r\ndata: z\r\r\n", [b"x", b"y", b"z"]),  # mixed, per line
    (b"data: line one\ndata: line two\n\n", [b"line one\nline two"]),
    (b"data: a\r\ndata:b\r\ndata\r\n\r\n", [b"a\nb\n"]),  # "data" alone: an empty line
    (b": keep-alive\n\n: comment\ndata: x\n: more\n\n", [b"x"]),
    (b"event: message\nid: 7\nretry: 10\ndata: x\n\n", [b"x"]),
    (b"event: ping\n\n", []),  # no data: nothing dispatched
    (b"data:  two spaces \n\n", [b" two spaces "]),  # only one leading space is dropped
    (b"data: x\n\n\n\ndata: y\n\n", [b"x", b"y"]),  # extra blank lines
    (b"data: x\n\ndata: unfinished", [b"x"]),  # an unfinished event is not dispatched
    (b"data: x\n\ndata: y\r\r", [b"x", b"y"]),  # a final CR ends the line at the end
]


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_whole_stream(stream: bytes, expected: list[bytes]) -> None:
    assert parse([stream]) == expected


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_every_split_point_and_byte_by_byte(stream: bytes, expected: list[bytes]) -> None:
    for cut in range(len(stream) + 1):
        assert parse([stream[:cut], stream[cut:]]) == expected, cut
    for first in range(len(stream)):
        for second in range(first, len(stream) + 1):
            pieces = [stream[:first], stream[first:second], stream[second:]]
            assert parse(pieces) == expected, (first, second)
    assert parse([stream[i : i + 1] for i in range(len(stream))]) == expected


def test_a_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # CR LF: one line end, not an empty line
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [b"a\nb"]


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    parser = SseParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n") == [b"1"]
    assert parser.feed(b"\n") == [b"2"]
    assert parser.feed(b"data: 3\r\n\r\n") == [b"3"]


def test_an_event_that_never_ends_is_bounded() -> None:
    parser = SseParser()
    piece = b"data: " + b"x" * (1 << 20)
    for _ in range(MAX_EVENT_BYTES // len(piece)):
        assert parser.feed(piece) == []
    with pytest.raises(EventTooLarge):
        parser.feed(piece)
