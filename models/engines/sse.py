"""The engine's server-sent events, parsed as the WHATWG event-stream rules say.

Lines end in CRLF, LF or a lone CR (a proxy in between may reframe vLLM's LF stream);
a blank line ends an event; an event's ``data:`` lines are joined with LF (one space
after the colon is dropped); comments (``:``) and the other fields (``event``, ``id``,
``retry``) are ignored; an event without data dispatches nothing. Chunks may split
anywhere, a CRLF included.

On the hot path (every streamed token passes here) the common case costs one ``split``
per read and one slice per event: a read holding whole ``data: ...`` events with LF
framing. Line endings are normalised to LF only in reads that carry a CR.
"""

from __future__ import annotations

_CR = b"\r"
_LF = b"\n"
_BLANK = b"\n\n"
_CRLF = b"\r\n"
_CRLF2 = b"\r\n\r\n"
_DATA = b"data"
_DATA_SP = b"data: "
MAX_EVENT_BYTES = 16 << 20  # an unfinished event longer than this ends the stream


class EventTooLarge(ValueError):
    pass


class SseParser:
    """Feed it the body as it arrives; it returns each complete event's data."""

    __slots__ = ("_cr", "_rest")

    def __init__(self) -> None:
        self._rest = b""  # the start of an event whose blank line has not come yet
        self._cr = False  # the last read ended in CR: it may be the first half of CRLF

    def feed(self, data: bytes) -> list[bytes]:
        if not self._rest and not self._cr and data.startswith(_DATA_SP):
            # vLLM on loopback: a read is one event, b"data: {...}\n\n" (or CRLF-framed)
            last = len(data) - 2
            if data.find(_LF) == last and data.endswith(_BLANK) and _CR not in data:
                return [data[6:last]]
            last -= 2
            if data.find(_CR) == last and data.endswith(_CRLF2) and data.find(_LF) == last + 1:
                return [data[6:last]]
        if self._cr:
            data = _CR + data
            self._cr = False
        if _CR in data:
            if data.endswith(_CR):
                data = data[:-1]
                self._cr = True
            data = data.replace(_CRLF, _LF)
            if _CR in data:
                data = data.replace(_CR, _LF)
        if self._rest:
            data = self._rest + data
        if _BLANK not in data:
            if len(data) > MAX_EVENT_BYTES:
                raise EventTooLarge(f"an event longer than {MAX_EVENT_BYTES} bytes")
            self._rest = data
            return []
        events = data.split(_BLANK)
        self._rest = events.pop()
        if len(self._rest) > MAX_EVENT_BYTES:
            raise EventTooLarge(f"an event longer than {MAX_EVENT_BYTES} bytes")
        out: list[bytes] = []
        for event in events:
            if event.startswith(_DATA_SP) and _LF not in event:
                out.append(event[6:])  # the common case: one data line
                continue
            payload = _data(event)
            if payload is not None:
                out.append(payload)
        return out

    def end(self) -> list[bytes]:
        """At the end of the body: a CR held back from the last read is a line end."""
        if not self._cr:
            return []
        self._cr = False
        return self.feed(_LF)


def _data(event: bytes) -> bytes | None:
    """The joined ``data`` of one event's lines (LF-separated), or None if it has none."""
    lines: list[bytes] = []
    for line in event.split(_LF):
        if not line or line[0] == 58:  # an empty line (before the event) or a ":" comment
            continue
        name, colon, value = line.partition(b":")
        if name != _DATA:
            continue
        if colon and value[:1] == b" ":
            value = value[1:]
        lines.append(value)
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else _LF.join(lines)
