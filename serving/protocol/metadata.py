"""Metadata on stored objects (a response, a batch): OpenAI's bounds, as numbers."""

from __future__ import annotations

MAX_METADATA = 16  # pairs
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 512


def bounded(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """``metadata`` when its keys and values are within OpenAI's lengths (a pydantic
    validator's ``ValueError`` otherwise); the pair count is the field's ``max_length``."""
    for key, value in (metadata or {}).items():
        if len(key) > MAX_KEY_CHARS or len(value) > MAX_VALUE_CHARS:
            raise ValueError(
                f"metadata keys are at most {MAX_KEY_CHARS} characters, values {MAX_VALUE_CHARS}"
            )
    return metadata
