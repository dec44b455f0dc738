"""Logging set-up for ``weir`` commands: one line per record, to stderr, text or JSON.

In JSON each record is one object; the per-request line (logger ``weir.access``) carries
its fields (request id, trace id, key hash, model, version, status, tokens, times)
as keys. No handler here ever formats a prompt, a completion or a key: the code never
logs them in the first place.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
