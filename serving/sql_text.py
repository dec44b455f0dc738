"""Text a SQL store cannot hold: PostgreSQL's text and jsonb take no NUL, and a lone
surrogate is no UTF-8 (SQLite and PostgreSQL alike cannot encode it)."""

from __future__ import annotations

import re

SURROGATE = re.compile("[\ud800-\udfff]")  # alone in a str: not UTF-8
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, or a lone surrogate


def keyable(text: str) -> bool:
    """Whether ``text`` can be a key a store is asked for: a query with one it cannot hold
    would fail (a 503), where a key that cannot exist is simply not found."""
    return UNSTORABLE.search(text) is None
