"""Logging set-up for ``weir`` commands: one line per record, to stderr, text or JSON.

In JSON each record is one object; the per-request line (logger ``weir.access``) carries
its fields (request id, trace id, key hash, model, version, status, tokens, times)
as keys. No handler here ever formats a prompt, a completion or a key: the code never
logs them in the first place.
"""

from __future__ import annotations

import logging
import time

import orjson

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
