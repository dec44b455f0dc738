"""Logging set-up for ``weir`` commands: one line per record, to stderr, text or JSON.

In JSON each record is one object; the per-request line (logger ``weir.access``) carries
its fields (request id, trace id, key hash, model, version, status, tokens, times)
as keys. No handler here ever formats a prompt, a completion or a key: the code never
logs them in the first place.

A record is one line in text too: control characters and line breaks in a message (a
field name or a value a client sent, whatever the call site did) are escaped, so no
client can forge a line; a traceback, written by the gateway, follows as it is.
"""

from __future__ import annotations

import logging
import re
import time

import orjson

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls (\n, \r, ESC for terminal tricks...) and the Unicode line and
# paragraph separators: whatever a reader or ``str.splitlines`` would break a line at
_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every control character escaped as Python would write it."""
    if not _BREAKS.search(text):
        return text
    return _BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextLines(logging.Formatter):
    """The text format, one line per record whatever the message holds."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


class JsonLines(logging.Formatter):
    """One JSON object per record, made with orjson (the access line is on the hot path).

    A record's ``fields`` (``extra={"fields": {...}}``) become top-level keys.
    """

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(TextLines(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
